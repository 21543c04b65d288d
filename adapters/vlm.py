"""What every vision-language family shares: the patched forward, the projector stage on each
visual item, the hand-off to the core language-model engine (:mod:`tokred.decoder`), outputs,
trace and the language model's FLOPs.

A family adapter (LLaVA, Qwen2-VL) subclasses :class:`VisionLanguageAdapter` and says only what
is its own: how to encode the images and videos of a call (:meth:`_encode_images`,
:meth:`_encode_videos`) and lay them out as :class:`VisualItem` s (:meth:`_visual_items`), the
prompt's positions (:meth:`_prompt_positions`, with the family's position scheme) and the FLOPs of
its vision encoder and projector.

The projector stage sees one :class:`VisualItem` per image and per video: its reducible tokens
(all frames of a video, frame by frame in raster order) with their
:class:`~tokred.signals.Layout` ``(frames, height, width)``, and its protected tokens (the
``image_newline`` after a LLaVA-OneVision video), which no projector reducer sees: they are kept
as they are, and ``llm``-stage reducers do not count them as visual tokens either, except one that
``counts_protected`` (HoliTom's inner stage), which may drop or merge them. Items with the same
token count and layout are planned together (``Reducer.plan_images``); a reducer that
``needs_tower_attention`` also gets each token's attention received in the vision tower, where
the family adapter provides it (:class:`RecordedEncoder` and the family's ``received_attention``).

Whatever a stage removes, the placeholder tokens, attention mask, positions, labels and the KV
cache follow, sample by sample: samples are left-padded again after pruning, so each sample is
pruned by its own content alone. When nothing is removed the model's own forward runs, bit for bit.

The trace and FLOPs describe the last prefill (a forward that starts a sequence: with images or
videos, or text only) and the encoding of the image and video features it used, whoever ran it
(the forward itself, ``generate`` before the prefill, or the user: each encoder call records what
it ran on its own output, :class:`Encoding`). Decode steps continuing its cache leave them.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from torch import Tensor, nn

from tokred.adapters.base import Adapter, replace_forward, restore_forward
from tokred.decoder import (CompatibilityError, LanguageModelEngine, Rotary1D, Sequence, Unmerged, cache_keyword,
                            transformers_version)
from tokred.flops import FlopsReport, LayerCosts, attention_flops, linear_flops
from tokred.plan import sequence_plan
from tokred.reducers.base import Reducer, keeps_everything
from tokred.signals import Layout
from tokred.trace import LayerRecord, Trace

#: the placeholder token of each modality, by config attribute
MODALITIES = {"image": "image_token_id", "video": "video_token_id"}


@dataclasses.dataclass
class VisualItem:
    """One image or video of a prompt, as the projector stage sees it.

    Attributes:
        modality: ``"image"`` or ``"video"``: the placeholder token its tokens fill (the family's
            ``image_token_id`` / ``video_token_id``); items fill their modality's placeholders in order.
        features: (n, C) the tokens a projector reducer may remove or merge, in placeholder order.
        count: its placeholder tokens in the prompt: n plus the protected tokens, or more when a
            vision-stage reducer already removed tokens (the remaining ones fill the first slots).
        layout: how ``features`` lie, (frames, height, width), or None if they form no grid.
        protected: (p, C) tokens that fill the last p placeholders, which the projector stage never
            removes or merges (LLaVA-OneVision's ``image_newline`` after a video), or None; visual
            tokens for an ``llm`` reducer only if it ``counts_protected``.
        received: (n,) mean attention each token received in the vision tower's last used layer,
            laid out like ``features``, when the adapter computed it (reducers that
            ``needs_tower_attention``), else None.
        sources: (count - p,) when a vision-stage reducer merged or pruned tokens: for each
            placeholder (each unreduced token) the row of ``features`` covering it, -1 if pruned
            (what VTU unmerges); None: ``features`` fill the first placeholders, one each.
    """

    modality: str
    features: Tensor
    count: int
    layout: Layout | None = None
    protected: Tensor | None = None
    received: Tensor | None = None
    sources: Tensor | None = None


class ModelMethod:
    """A callable standing in for the model's method ``original`` for ``adapter``: an object rather
    than a closure, so that ``copy.deepcopy`` of the model gives a copy calling the copy's adapter. It
    shows the original's name and signature (``generate`` inspects them) and pickles as (adapter,
    original) alone: the copies ``functools.update_wrapper`` makes (annotations) need not pickle."""

    def __init__(self, adapter: VisionLanguageAdapter, original):
        self.adapter, self.original = adapter, original
        functools.update_wrapper(self, original)

    def __reduce__(self):
        return type(self), (self.adapter, self.original)


class PatchedForward(ModelMethod):
    """The patched model's ``forward`` (``original``: the class's): calls its adapter."""

    def __call__(self, *args, **kwargs):
        return self.adapter.forward(*args, **kwargs)


class PatchedGenerate(ModelMethod):
    """The patched model's ``generate``: the model's own, during which the adapter knows the prompt's
    length (:attr:`VisionLanguageAdapter.generating`: the given ``input_ids``' or, without them, the
    first prefill's). Reducers then decide on the prompt alone, as in a cached run, also where a
    forward runs more than the prompt: every step of ``generate(use_cache=False)`` (the prompt and
    the tokens generated so far) and the prefill of assisted decoding (the prompt and the first
    drafts)."""

    def __call__(self, *args, **kwargs):
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        known = {"prompt_length": prompt.shape[1]} if isinstance(prompt, Tensor) and prompt.dim() == 2 else {}
        outer, self.adapter.generating = self.adapter.generating, known
        try:
            return self.original(*args, **kwargs)
        finally:
            self.adapter.generating = outer


@dataclasses.dataclass
class Encoding:
    """What the vision encoder ran in one ``get_<modality>_features`` call: the family adapter's
    record of each encoder run (its FLOPs; LLaVA: the tower's trace), and the FLOPs of the tower
    attention recomputed for a reducer that ``needs_tower_attention``."""

    runs: list = dataclasses.field(default_factory=list)
    attention_flops: int = 0


class RecordedEncoder(ModelMethod):
    """The model's ``get_image_features`` / ``get_video_features`` (``original``), recording on its
    output ``tokred_encoding`` (the :class:`Encoding` the family's hooks fill while it runs, in
    ``adapter.encoding``; also kept as ``adapter.latest[modality]``) and, for the
    ``attention_modalities`` when the adapter has an ``attention_layer``, ``tokred_received``: per
    item, the attention each of its tokens received in that layer
    (:meth:`VisionLanguageAdapter.received_attention`, on the layer's inputs captured while the
    method runs). Installed on the model while it is patched; ``generate`` encodes through it before
    the prefill, a forward through the adapter."""

    @property
    def modality(self) -> str:
        return self.original.__name__.removeprefix("get_").removesuffix("_features")

    def __call__(self, *args, **kwargs):
        adapter, captured, hook = self.adapter, [], None
        if adapter.attention_layer is not None and self.modality in adapter.attention_modalities:
            hook = adapter.attention_layer.register_forward_pre_hook(
                lambda module, layer_args, layer_kwargs: captured.append((layer_args, layer_kwargs)), with_kwargs=True)
        outer = adapter.encoding
        adapter.encoding = encoding = outer if outer is not None else Encoding()  # a nested call adds to its caller's
        try:
            out = self.original(*args, **kwargs)
            if hook is not None:
                out.tokred_received = adapter.received_attention(captured[-1], (args, kwargs))
        finally:
            adapter.encoding = outer
            if hook is not None:
                hook.remove()
        if outer is None:
            adapter.latest[self.modality] = encoding
            if not isinstance(out, tuple):  # return_dict=False: a tuple, which takes no record
                out.tokred_encoding = encoding
        return out


class VisionLanguageAdapter(Adapter):
    """The shared half of every VLM adapter (see the module docstring). Subclasses set ``scheme``
    (the language model's position scheme) and ``output_class``, and implement the hooks."""

    scheme = Rotary1D()

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer], language_model: nn.Module):
        super().__init__(model, reducers)
        name = type(model).__name__
        for reducer in reducers.values():
            self.scheme.convention(getattr(reducer, "positions", None), name)  # refuses what the scheme cannot do
        self.engine = LanguageModelEngine(language_model, reducers.get("llm"), self.scheme, name)
        if reducers:  # without one, every forward is the model's own
            self.engine.check_attention()
        if self.engine.unmerges and not {"vision", "projector"} & set(reducers):
            raise ValueError(f"{type(reducers['llm']).__name__} unmerges, inside the language model, the tokens that a "
                             "reducer at the 'vision' or 'projector' stage merged: apply it with one, e.g. "
                             "tokred.apply(model, tokred.DToMe(thresholds=...), tokred.VTU())")
        self.language_model, self.layers = self.engine.language_model, self.engine.layers
        self.original_forward = type(model).forward.__get__(model)  # the class's, even while patched
        self.cache_keyword = cache_keyword(type(model).forward, f"{name}.forward")
        self.known_keywords = self._known_keywords()
        self.config = model.config
        self.vision_trace: Trace | None = None  # the vision stage's trace of the last prefill, if it has one
        self.logit_rows = 0  # rows the LM head ran on in the last prefill
        self.encoding: Encoding | None = None  # open while an encoder call runs (:class:`RecordedEncoder`)
        self.encodings: list[Encoding] = []  # the encodings of the features the last prefill used
        self.latest: dict[str, Encoding] = {}  # per modality, the last encoder call's
        #: while ``generate`` runs (:class:`PatchedGenerate`): {"prompt_length": the prompt's length}
        self.generating: dict | None = None

    # hooks ------------------------------------------------------------------------------------------
    def _encode_images(self, call: dict):
        """The model's own image encoding of the call (``get_image_features``' output)."""
        raise NotImplementedError

    def _encode_videos(self, call: dict):
        """The model's own video encoding of the call (``get_video_features``' output)."""
        raise ValueError(f"{type(self.model).__name__} takes no video inputs")

    def _visual_items(self, call: dict, encoded: dict) -> list[VisualItem]:
        """The call's images, then its videos, as :class:`VisualItem` s, from ``encoded`` (modality ->
        the model's encoder output, as ``mm_encoder_outputs`` holds it)."""
        raise NotImplementedError

    def _prompt_positions(self, call: dict, valid: Tensor) -> Tensor:
        """Positions of the prompt's tokens in the scheme's layout."""
        return self.scheme.prompt(valid, call.get("position_ids"))

    def _after_prefill(self, next_position: Tensor, kept_length: Tensor) -> None:
        """Family state to update after a reduced prefill (e.g. Qwen2-VL's rope deltas)."""

    #: the vision-tower layer whose attention a reducer that ``needs_tower_attention`` gets (set by
    #: the family adapter when it has one and such a reducer is applied), else None
    attention_layer: nn.Module | None = None
    #: the modalities whose encoder (``get_<modality>_features``) also gives the tower attention
    attention_modalities: tuple[str, ...] = ("video",)

    def received_attention(self, layer_call: tuple[tuple, dict], call: tuple[tuple, dict]) -> list[Tensor]:
        """Per item of an encoder call ``call`` (its args and kwargs), (n,) the attention each of its
        tokens received in ``attention_layer``, from that layer's inputs ``layer_call``, laid out like
        the item's features; adds the FLOPs it ran to ``self.encoding.attention_flops``."""
        raise NotImplementedError

    # patching -------------------------------------------------------------------------------------
    def patch(self) -> None:
        base = self.model.model
        for modality in MODALITIES:
            name = f"get_{modality}_features"
            if hasattr(base, name):
                setattr(base, name, RecordedEncoder(self, getattr(base, name)))
        replace_forward(self.model, PatchedForward(self, self.original_forward))
        self._previous_generate = self.model.__dict__.get("generate")
        self.model.generate = PatchedGenerate(self, self.model.generate)
        self.model._tokred_adapter = self

    def unpatch(self) -> None:
        for modality in MODALITIES:
            self.model.model.__dict__.pop(f"get_{modality}_features", None)
        restore_forward(self.model)
        if self._previous_generate is None:
            del self.model.generate
        else:
            self.model.generate = self._previous_generate
        del self.model._tokred_adapter

    def _known_keywords(self) -> frozenset[str]:
        """Keywords the patched forward accounts for: the class forward's named parameters, the
        transformers keyword arguments it accepts, both names of the cache and tokred's own."""
        from transformers.utils.generic import TransformersKwargs

        parameters = inspect.signature(type(self.model).forward).parameters
        named = {k for k, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        return frozenset(named | set(TransformersKwargs.__annotations__) | {
            "cache", "past_key_values", "use_cache", "return_dict", "prompt_length"})

    # forward --------------------------------------------------------------------------------------
    def forward(self, *args, return_dict: bool | None = None, **kwargs):
        """The patched forward; a tuple (``to_tuple()``) with ``return_dict=False``, or with the
        config's ``return_dict`` False, as the unpatched forward returns."""
        out = self._forward(*args, **kwargs)
        as_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if as_dict else out.to_tuple()

    def _forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                 attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                 labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                 prompt_length: int | None = None, **kwargs):
        unknown = sorted(set(kwargs) - self.known_keywords)
        if unknown:
            name = type(self.model).__name__
            raise TypeError(f"{name}.forward got the keyword argument(s) {', '.join(map(repr, unknown))}, which "
                            f"tokred's patched forward does not know (neither a parameter of {name}.forward in "
                            f"transformers {transformers_version()} nor tokred's own): check the spelling or leave "
                            "it out; tokred.remove(model) runs the model unreduced")
        cache = kwargs.pop("cache", None)  # transformers >= 5.24; the old name wins only when alone
        old_name = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else old_name
        # generate() encodes images and videos before the prefill
        encoded = {k: v for k, v in (kwargs.get("mm_encoder_outputs") or {}).items() if v is not None}
        visual = pixel_values is not None or kwargs.get("pixel_values_videos") is not None or bool(encoded)
        state = getattr(cache, "_tokred", None)
        if state is not None:
            if visual:
                raise ValueError("this cache holds a reduced prefill; tokred cannot add new images or videos to it. "
                                 "Start a new prefill with an empty cache (or none) for a prompt with new ones")
            return self._decode(state, input_ids, inputs_embeds, attention_mask, cache, logits_to_keep,
                                self._decode_positions(kwargs.get("position_ids")))
        call = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                    inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
                    return_dict=True, **kwargs, **{self.cache_keyword: cache})
        if not visual:  # text only, or a decode step of an unreduced prefill
            tokens = input_ids if input_ids is not None else inputs_embeds
            self._check_plain_cache(cache, tokens, attention_mask)
            starts = cache is None or cache.get_seq_length() == 0
            out = self.original_forward(**call)
            if starts:  # a text-only prefill
                self.logit_rows = out.logits.shape[0] * out.logits.shape[1]
                self._finish_trace(tokens.shape[0], [(0, tokens.shape[1])], None, {})
            return out
        if input_ids is None:
            raise ValueError("tokred needs input_ids (to find the image and video placeholders) when pixel values "
                             "are given")
        if self.generating is not None and prompt_length is None:  # the forward may run more than the prompt
            prompt_length = self.generating.setdefault("prompt_length", input_ids.shape[1])
        if pixel_values is not None and "image" not in encoded:
            encoded["image"] = self._encode_images(call)
        if call.get("pixel_values_videos") is not None and "video" not in encoded:
            encoded["video"] = self._encode_videos(call)
        return self._prefill(call, cache, encoded, prompt_length)

    def encoding_of(self, encoded: dict, modality: str) -> Encoding | None:
        """The encoding behind ``encoded[modality]``: recorded on it or, when the output reached the
        forward as a copy (accelerate's hooks rebuild it on the way), the last encoder call of that
        modality's (``generate`` encodes right before the prefill)."""
        return getattr(encoded[modality], "tokred_encoding", None) or self.latest.get(modality)

    def _encodings(self, encoded: dict) -> list[Encoding]:
        """The encodings behind the features in ``encoded``, each once."""
        found = [self.encoding_of(encoded, modality) for modality in encoded]
        return [e for i, e in enumerate(found) if e is not None and all(e is not f for f in found[:i])]

    def _check_plain_cache(self, cache, new_tokens: Tensor | None, attention_mask: Tensor | None) -> None:
        """A call that continues a cache without tokred's bookkeeping must continue an unreduced
        prefill: every layer holds the same number of tokens, and the attention mask covers exactly
        the cached and the new tokens. Anything else is a reduced prefill's cache that lost its
        bookkeeping (a ``CompatibilityError``: decoding it as unreduced would be silently wrong)."""
        if cache is None or cache.get_seq_length() == 0:
            return
        lengths = {layer.keys.shape[-2] for layer in cache.layers if getattr(layer, "keys", None) is not None}
        queries = new_tokens.shape[1] if new_tokens is not None else 0
        mask_covers = attention_mask is None or attention_mask.shape[1] == cache.get_seq_length() + queries
        if len(lengths) > 1 or not mask_covers:
            raise CompatibilityError(
                f"a decode step continues a cache of {sorted(lengths)} tokens per layer with an attention mask "
                f"of {attention_mask.shape[1] if attention_mask is not None else None} tokens for {queries} new "
                "one(s): the cache comes from a reduced prefill but does not carry tokred's bookkeeping "
                "(it was copied or rebuilt, or the cache reached the forward under a name tokred does not know)")

    def _placeholders(self, input_ids: Tensor, items: list[VisualItem]) -> list[tuple[int, Tensor]]:
        """Per item, (sample, positions of its placeholder tokens); the items of each modality fill
        that modality's placeholders in order."""
        runs: list[tuple[int, Tensor] | None] = [None] * len(items)
        for modality, token in MODALITIES.items():
            mine = [i for i, item in enumerate(items) if item.modality == modality]
            if not mine:
                continue
            counts = [items[i].count for i in mine]
            is_placeholder = input_ids == getattr(self.config, token)
            if int(is_placeholder.sum()) != sum(counts):
                raise ValueError(f"the prompt has {int(is_placeholder.sum())} {modality} placeholder tokens but the "
                                 f"{modality}s need {sum(counts)} ({len(counts)} {modality}s of {counts} tokens); "
                                 f"build the prompt with the model's processor for these {modality}s")
            samples, positions = is_placeholder.nonzero(as_tuple=True)
            start = 0
            for i, count in zip(mine, counts):
                sample = samples[start:start + count]
                if bool((sample != sample[0]).any()):
                    raise ValueError(f"a {modality}'s placeholder tokens are split across two samples of the batch; "
                                     f"each sample's prompt must hold the placeholders of its own {modality}s")
                runs[i] = (int(sample[0]), positions[start:start + count])
                start += count
        return runs

    def _projector(self, items: list[VisualItem], record: LayerRecord) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per item, (kept slots among its placeholders, their features, the slot each input feature
        ended in or -1), after the projector reducer; protected tokens are not among them. Items with
        the same number of tokens and the same layout are planned together. Each kept token fills the
        slot of its own input token (sequence order), or, when the plan is ``ordered`` and positions
        are renumbered, the first slots in the plan's order."""
        reducer = self.reducers.get("projector")
        renumbered = self.scheme.convention(getattr(reducer, "positions", None)) == "renumber"
        out: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((item.features.shape[0], item.layout), []).append(i)
        for (length, layout), members in groups.items():
            stacked = torch.stack([items[i].features for i in members])
            slots = destinations = torch.arange(length, device=stacked.device).expand(len(members), -1)
            in_plan_order = False
            if reducer is not None:
                record.reducer_flops += reducer.overhead_flops(stacked, layout)
                extra = {}
                if reducer.needs_tower_attention:
                    if any(items[i].received is None for i in members):
                        raise ValueError(f"{type(reducer).__name__} ranks tokens by the attention they received in "
                                         f"the vision tower, which tokred provides for LLaVA-OneVision videos and "
                                         f"Qwen2-VL images and videos; {type(self.model).__name__} gave none for this "
                                         f"{items[members[0]].modality}")
                    extra["received"] = torch.stack([items[i].received for i in members])
                plan = reducer.plan_images(stacked, layout, **extra)
                if plan.merges:
                    stacked = plan.weighted_mean(stacked, stacked.new_ones(*stacked.shape[:2], 1))[0]
                else:
                    stacked = plan.select(stacked)
                slots, destinations = plan.keep, plan.destinations()
                in_plan_order = plan.ordered and renumbered
            for j, i in enumerate(members):
                real = slots[j] < length  # a padded plan (per-image counts, e.g. a Budget) pads with slot N
                place = real.cumsum(0) - 1 if in_plan_order else slots[j]  # the slot each output fills
                order = place[real].argsort()  # features go to their slots in sequence order
                ended = torch.where(destinations[j] >= 0, place[destinations[j].clamp(min=0)], -1)
                out[i] = (place[real][order], stacked[j][real][order], ended)
        return out

    def _prefill(self, call: dict, cache, encoded, prompt_length: int | None):
        """A forward on a prompt with images: the visual items, the projector stage, then the
        language model (the model's own forward when nothing is removed)."""
        input_ids, attention_mask = call["input_ids"], call["attention_mask"]
        batch, length = input_ids.shape
        items = self._visual_items(call, encoded)
        runs = self._placeholders(input_ids, items)
        total = sum(item.count for item in items)
        record = LayerRecord("projector", 0, tokens_in=total, tokens_attention=total, tokens_out=total)
        kept = self._projector(items, record)
        protected = [0 if item.protected is None else item.protected.shape[0] for item in items]
        record.tokens_out = sum(int(k[0].numel()) for k in kept) + sum(protected)
        record.tokens_per_image = [int(k[0].numel()) + p for k, p in zip(kept, protected)]
        removed = record.tokens_out < record.tokens_in
        llm = self.reducers.get("llm")
        if not removed and (llm is None or keeps_everything(llm.keep)):
            return self._unreduced(call, encoded, record)
        for flag in ("output_attentions", "output_hidden_states"):
            if call.get(flag):
                raise ValueError(f"{flag} is not supported while tokred removes tokens; call tokred.remove(model)")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("tokred starts a reduced prefill from an empty cache; got a cache that already holds "
                             f"{cache.get_seq_length()} tokens")

        embeds = self.language_model.embed_tokens(input_ids)
        keep = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
        visual = torch.zeros_like(keep)
        for (sample, positions), (slots, values, _), item, last in zip(runs, kept, items, protected):
            keep[sample, positions] = False
            visual[sample, positions[slots]] = True
            keep[sample, positions[slots]] = True
            embeds[sample, positions[slots]] = values.to(embeds.dtype)
            if last:  # protected: kept as they are; visual tokens only for an llm reducer that counts them
                keep[sample, positions[-last:]] = True
                visual[sample, positions[-last:]] = llm is not None and llm.counts_protected
                embeds[sample, positions[-last:]] = item.protected.to(embeds.dtype)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(keep)
        positions = self._prompt_positions(call, valid)
        index = torch.arange(length, device=keep.device).expand(batch, -1)
        prompt = valid & (index < (length if prompt_length is None else prompt_length))
        seq = Sequence(embeds, positions, valid, visual, prompt, index + 1)
        next_position = self.scheme.next_position(positions, valid)
        if self.engine.unmerges:
            seq.unmerged = self._unmerged(runs, items, [k[2] for k in kept], valid, positions, next_position)
        if removed:
            projector = self.reducers.get("projector")
            convention = self.scheme.convention(getattr(projector, "positions", None))
            seq, next_position = seq.apply(sequence_plan(keep & valid), convention, next_position, self.scheme)
        return self._run_language_model(seq, next_position, call, cache, record, encoded)

    @staticmethod
    def _unmerged(runs: list[tuple[int, Tensor]], items: list[VisualItem], ended: list[Tensor], valid: Tensor,
                  positions: Tensor, next_position: Tensor) -> Unmerged:
        """VTU's virtual sequence: the unreduced prompt, each token a copy of the prompt token that
        stands for it after the vision and projector stages (text and protected tokens themselves; a
        placeholder the token its patch merged into, through ``item.sources`` and the slot its
        feature ``ended`` in; -1 for padding and pruned tokens)."""
        batch, length = valid.shape
        rows = torch.where(valid, torch.arange(length, device=valid.device), -1)
        for (sample, places), item, slot in zip(runs, items, ended):
            visible = item.count - (0 if item.protected is None else item.protected.shape[0])
            index = torch.arange(visible, device=valid.device)
            feature = item.sources if item.sources is not None else torch.where(index < slot.shape[0], index, -1)
            covered = torch.where(feature >= 0, slot[feature.clamp(min=0)], -1)
            rows[sample, places[:visible]] = torch.where(covered >= 0, places[covered.clamp(min=0)], -1)
        return Unmerged(rows, positions, next_position)

    def _unreduced(self, call: dict, encoded: dict, record: LayerRecord):
        """Nothing removed: the model's own forward on the image and video features already computed."""
        pixels = {k: None for k in ("pixel_values", "pixel_values_videos") if k in call}
        out = self.original_forward(**{**call, **pixels, "mm_encoder_outputs": encoded})
        batch, length = call["input_ids"].shape
        self.logit_rows = out.logits.shape[0] * out.logits.shape[1]
        self._finish_trace(batch, [(0, length)], record, {}, encodings=self._encodings(encoded))
        return out

    # the language model ---------------------------------------------------------------------------
    def _run_language_model(self, seq: Sequence, next_position: Tensor, call: dict, cache,
                            projector_record: LayerRecord, encoded: dict):
        use_cache = call["use_cache"] if call["use_cache"] is not None else self.config.text_config.use_cache
        cache = cache if cache is not None else self.engine.new_cache()
        run = self.engine.prefill(seq, next_position, cache, keep_cache=use_cache)
        self._after_prefill(run.segments[-1].next_position, run.sequence.valid.sum(dim=1))
        self._finish_trace(seq.hidden.shape[0], run.lengths, projector_record, run.plans, run.attention_length,
                           self._encodings(encoded))
        if run.sequence.size is not None:  # an llm-stage plan merged tokens: what each final token stands for
            self.trace.sizes = run.sequence.size[..., 0]
        labels = call["labels"]
        if labels is not None:
            origin = run.sequence.origin
            labels = torch.where(origin > 0, labels.gather(1, (origin - 1).clamp(min=0)), -100)
        out = self._output(run.hidden, call["logits_to_keep"], labels, cache if use_cache else None, encoded)
        self.logit_rows = out.logits.shape[0] * out.logits.shape[1]
        return out

    def _decode_positions(self, position_ids: Tensor | None) -> Tensor | None:
        """The decode step's positions in the scheme's layout when the caller's ones are the unpatched
        model's whatever was removed (None: the engine's next positions)."""
        return None

    def _decode(self, segments, input_ids, inputs_embeds, attention_mask, cache, logits_to_keep, positions=None):
        hidden = self.language_model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self._output(self.engine.decode(segments, hidden, attention_mask, cache, positions), logits_to_keep,
                            None, cache)

    def output_class(self) -> type:
        """The output dataclass the unpatched forward returns."""
        raise NotImplementedError

    def _output(self, hidden: Tensor, logits_to_keep, labels: Tensor | None, cache, encoded: dict | None = None):
        """The output the unpatched forward returns: its class, its cache field and, after a prefill, the
        encoder outputs of the images and videos (``image_outputs`` / ``video_outputs``) it has fields for."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.model.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.model.loss_function(logits=logits, labels=labels,
                                            vocab_size=self.config.text_config.vocab_size)
        output_class = self.output_class()
        fields = {f.name for f in dataclasses.fields(output_class)}
        cache_field = "cache" if "cache" in fields else "past_key_values"
        encoders = {f"{m}_outputs": v for m, v in (encoded or {}).items() if f"{m}_outputs" in fields}
        return output_class(loss=loss, logits=logits, **{cache_field: cache}, **encoders)

    # trace and FLOPs --------------------------------------------------------------------------------
    def _finish_trace(self, batch: int, lengths: list[tuple[int, int]], projector_record: LayerRecord | None,
                      plans: dict[int, tuple[int, list[int]]], attention_length: int | None = None,
                      encodings: list[Encoding] = ()) -> None:
        """The trace of the last prefill; ``projector_record``: None for a text-only prompt; ``plans``:
        per decoder layer an ``llm``-stage plan acted before, the reducer's FLOPs and the tokens per
        sample after it; ``attention_length``: the virtual sequence every layer's attention ran on,
        when VTU ran; ``encodings``: of the image and video features it used."""
        self.encodings = list(encodings)
        self.vision_trace = self._vision_trace(self.encodings)
        trace = Trace(batch_size=batch, num_prefix=0, grid=None)
        if self.vision_trace is not None:
            trace.layers += self.vision_trace.layers
            trace.notes += self.vision_trace.notes
        if projector_record is not None:
            trace.layers.append(projector_record)
        starts = [start for start, _ in lengths]
        for i in range(len(self.layers)):
            length = lengths[sum(start <= i for start in starts) - 1][1]
            previous = lengths[sum(start < i for start in starts) - 1][1] if i else length
            record = LayerRecord("llm", i, tokens_in=previous, tokens_attention=attention_length or length,
                                 tokens_out=length)
            if i in plans:
                record.reducer_flops, record.tokens_per_image = plans[i]
            trace.layers.append(record)
        self.trace = trace

    def llm_costs(self, layer: int) -> LayerCosts:
        decoder = self.layers[layer]
        attn = decoder.self_attn
        heads = self.language_model.config.num_attention_heads
        return LayerCosts(per_attention_token=linear_flops(attn, 1),
                          per_token_pair=attention_flops(1, heads, 1, 1, attn.head_dim),
                          per_mlp_token=linear_flops(decoder.mlp, 1))

    def _vision_trace(self, encodings: list[Encoding]) -> Trace | None:
        """The vision stage's trace among ``encodings``, if the family has one."""
        return None

    def add_vision_flops(self, report: FlopsReport) -> None:
        """Add the FLOPs of ``self.encodings`` (the vision encoder and projector runs behind the last
        prefill's features, tower attention included) to ``report``."""
        raise NotImplementedError

    def flops(self, trace: Trace) -> FlopsReport:
        """FLOPs of the last prefill by stage (``vision``, ``projector``, ``llm_prefill``) and of one
        decode step after it (``report.decode_per_token``: one new token per sample, with the cache the
        prefill left)."""
        report = FlopsReport(decode_per_token=linear_flops(self.model.lm_head, trace.batch_size))
        self.add_vision_flops(report)
        batch = trace.batch_size
        for record in trace.layers:
            if record.stage == "projector" and record.reducer_flops:
                report.add("projector", "reducer", record.reducer_flops)
            if record.stage != "llm":
                continue
            costs = self.llm_costs(record.layer)
            report.add("llm_prefill", f"layer{record.layer}",
                       batch * costs.flops(record.tokens_out, record.tokens_out, record.tokens_attention))
            if record.reducer_flops:
                report.add("llm_prefill", f"layer{record.layer}.reducer", record.reducer_flops)
            decode = (costs.per_attention_token + costs.per_token_pair * (record.tokens_attention + 1)
                      + costs.per_mlp_token)
            report.decode_per_token += batch * decode
        report.add("llm_prefill", "lm_head", linear_flops(self.model.lm_head, self.logit_rows))
        return report
