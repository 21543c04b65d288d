"""What every vision-language family shares: the patched forward, the projector stage on each
visual item, the hand-off to the core language-model engine (:mod:`tokred.decoder`), outputs,
trace and the language model's FLOPs.

A family adapter (LLaVA, Qwen2-VL) subclasses :class:`VisionLanguageAdapter` and says only what
is its own: how to encode the images of a call (:meth:`_visual_items`: per image its features, its
number of placeholder tokens and its layout), the prompt's positions (:meth:`_prompt_positions`,
with the family's position scheme) and the FLOPs of its vision encoder and projector.

Whatever a stage removes, the placeholder tokens, attention mask, positions, labels and the KV
cache follow, sample by sample: samples are left-padded again after pruning, so each sample is
pruned by its own content alone. When nothing is removed the model's own forward runs, bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from torch import Tensor, nn

from tokred.adapters.base import Adapter
from tokred.decoder import CompatibilityError, LanguageModelEngine, Rotary1D, Sequence, cache_keyword
from tokred.flops import FlopsReport, LayerCosts, attention_flops, linear_flops
from tokred.plan import sequence_plan
from tokred.reducers.base import Reducer, keeps_everything
from tokred.signals import Layout
from tokred.trace import LayerRecord, Trace


class PatchedForward:
    """The patched model's ``forward``: calls its adapter, and shows the class forward's signature
    (``generate`` inspects it). An object rather than a closure so that ``copy.deepcopy`` of the
    model gives a copy whose forward calls the copy's adapter."""

    def __init__(self, adapter: VisionLanguageAdapter):
        self.adapter = adapter
        functools.update_wrapper(self, adapter.original_forward)

    def __call__(self, *args, **kwargs):
        return self.adapter.forward(*args, **kwargs)


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
        self.language_model, self.layers = self.engine.language_model, self.engine.layers
        self.original_forward = type(model).forward.__get__(model)  # the class's, even while patched
        self.cache_keyword = cache_keyword(type(model).forward, f"{name}.forward")
        self.known_keywords = self._known_keywords()
        self.config = model.config
        self.vision_trace: Trace | None = None  # the vision stage's trace of the last prefill, if it has one
        self.logit_rows = 0  # rows the LM head ran on in the last prefill

    # hooks ------------------------------------------------------------------------------------------
    def _encode_images(self, call: dict):
        """The model's own image encoding of the call (``get_image_features``' output)."""
        raise NotImplementedError

    def _visual_items(self, call: dict, encoded) -> tuple[list[Tensor], list[int], list[Layout | None]]:
        """Per visual item: its features (n, C) for the projector stage, its placeholder count, and
        its :class:`~tokred.signals.Layout` (None if its tokens form no grid)."""
        raise NotImplementedError

    def _prompt_positions(self, call: dict, valid: Tensor) -> Tensor:
        """Positions of the prompt's tokens in the scheme's layout."""
        return self.scheme.prompt(valid, call.get("position_ids"))

    def _check_call(self, call: dict) -> None:
        """Refuse inputs the family adapter does not handle (e.g. video)."""

    def _after_prefill(self, next_position: Tensor, kept_length: Tensor) -> None:
        """Family state to update after a reduced prefill (e.g. Qwen2-VL's rope deltas)."""

    # patching -------------------------------------------------------------------------------------
    def patch(self) -> None:
        self.model.forward = PatchedForward(self)
        self.model._tokred_adapter = self

    def unpatch(self) -> None:
        del self.model.forward
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
    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                prompt_length: int | None = None, **kwargs):
        unknown = sorted(set(kwargs) - self.known_keywords)
        if unknown:
            raise CompatibilityError(f"{type(self.model).__name__}.forward got keyword(s) {unknown} that tokred's "
                                     "adapter does not know")
        cache = kwargs.pop("cache", None)  # transformers >= 5.24; the old name wins only when alone
        old_name = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else old_name
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")  # generate() encodes images first
        state = getattr(cache, "_tokred", None)
        if state is not None:
            if pixel_values is not None or encoded is not None:
                raise ValueError("this cache holds a reduced prefill; tokred cannot add new images to it. Start a "
                                 "new prefill with an empty cache (or none) for a prompt with new images")
            return self._decode(state, input_ids, inputs_embeds, attention_mask, cache, logits_to_keep)
        call = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                    inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
                    **kwargs, **{self.cache_keyword: cache})
        self._check_call(call)
        if pixel_values is None and encoded is None:  # text only, or a decode step of an unreduced prefill
            self._check_plain_cache(cache, input_ids if input_ids is not None else inputs_embeds, attention_mask)
            return self.original_forward(**call)
        if input_ids is None:
            raise ValueError("tokred needs input_ids (to find the image placeholders) when pixel_values are given")
        return self._prefill(call, cache, encoded if encoded is not None else self._encode_images(call),
                             prompt_length)

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

    def _placeholders(self, input_ids: Tensor, counts: list[int]) -> list[tuple[int, Tensor]]:
        """Per image, (sample, positions of its placeholder tokens); images fill the placeholders in order."""
        is_image = input_ids == self.config.image_token_id
        if int(is_image.sum()) != sum(counts):
            raise ValueError(f"the prompt has {int(is_image.sum())} image placeholder tokens but the images need "
                             f"{sum(counts)} ({len(counts)} images of {counts} tokens); build the prompt with the "
                             "model's processor for these images")
        samples, positions = is_image.nonzero(as_tuple=True)
        runs, start = [], 0
        for count in counts:
            sample = samples[start:start + count]
            if bool((sample != sample[0]).any()):
                raise ValueError("an image's placeholder tokens are split across two samples of the batch; each "
                                 "sample's prompt must hold the placeholders of its own images")
            runs.append((int(sample[0]), positions[start:start + count]))
            start += count
        return runs

    def _projector(self, features: list[Tensor], layouts: list[Layout | None],
                   record: LayerRecord) -> list[tuple[Tensor, Tensor]]:
        """Per item, (kept slots among its placeholders, their features), after the projector
        reducer. Items with the same number of tokens and the same layout are planned together."""
        reducer = self.reducers.get("projector")
        out: list[tuple[Tensor, Tensor] | None] = [None] * len(features)
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(features):
            groups.setdefault((f.shape[0], layouts[i]), []).append(i)
        for (length, layout), images in groups.items():
            stacked = torch.stack([features[i] for i in images])
            slots = torch.arange(length, device=stacked.device).expand(len(images), -1)
            if reducer is not None:
                record.reducer_flops += reducer.overhead_flops(stacked)
                plan = reducer.plan_images(stacked, layout)
                if plan.merges:
                    stacked = plan.weighted_mean(stacked, stacked.new_ones(*stacked.shape[:2], 1))[0]
                else:
                    stacked = plan.select(stacked)
                slots = plan.keep
            for j, i in enumerate(images):
                order = slots[j].argsort()  # features go to their slots in sequence order
                out[i] = (slots[j][order], stacked[j][order])
        return out

    def _prefill(self, call: dict, cache, encoded, prompt_length: int | None):
        """A forward on a prompt with images: the visual items, the projector stage, then the
        language model (the model's own forward when nothing is removed)."""
        input_ids, attention_mask = call["input_ids"], call["attention_mask"]
        batch, length = input_ids.shape
        features, counts, layouts = self._visual_items(call, encoded)
        runs = self._placeholders(input_ids, counts)
        record = LayerRecord("projector", 0, tokens_in=sum(counts), tokens_attention=sum(counts),
                             tokens_out=sum(counts))
        kept = self._projector(features, layouts, record)
        record.tokens_out = sum(int(k[0].numel()) for k in kept)
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
        for (sample, positions), (slots, values) in zip(runs, kept):
            keep[sample, positions] = False
            visual[sample, positions[slots]] = True
            keep[sample, positions[slots]] = True
            embeds[sample, positions[slots]] = values.to(embeds.dtype)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(keep)
        positions = self._prompt_positions(call, valid)
        index = torch.arange(length, device=keep.device).expand(batch, -1)
        prompt = valid & (index < (length if prompt_length is None else prompt_length))
        seq = Sequence(embeds, positions, valid, visual, prompt, index + 1)
        next_position = self.scheme.next_position(positions, valid)
        if removed:
            projector = self.reducers.get("projector")
            convention = self.scheme.convention(getattr(projector, "positions", None))
            seq, next_position = seq.apply(sequence_plan(keep & valid), convention, next_position, self.scheme)
        return self._run_language_model(seq, next_position, call, cache, record)

    def _unreduced(self, call: dict, encoded, record: LayerRecord):
        """Nothing removed: the model's own forward on the image features already computed."""
        out = self.original_forward(**{**call, "pixel_values": None, "mm_encoder_outputs": {"image": encoded}})
        batch, length = call["input_ids"].shape
        self.logit_rows = out.logits.shape[0] * out.logits.shape[1]
        self._finish_trace(batch, [(0, length)], record, None)
        return out

    # the language model ---------------------------------------------------------------------------
    def _run_language_model(self, seq: Sequence, next_position: Tensor, call: dict, cache,
                            projector_record: LayerRecord):
        use_cache = call["use_cache"] if call["use_cache"] is not None else self.config.text_config.use_cache
        cache = cache if cache is not None else self.engine.new_cache()
        run = self.engine.prefill(seq, next_position, cache, keep_cache=use_cache)
        self._after_prefill(run.segments[-1].next_position, run.sequence.valid.sum(dim=1))
        llm = self.reducers.get("llm")
        self._finish_trace(seq.hidden.shape[0], run.lengths, projector_record,
                           (llm.layer, run.reducer_flops) if llm is not None else None, run.tokens_per_sample)
        if run.sequence.size is not None:  # an llm-stage plan merged tokens: what each final token stands for
            self.trace.sizes = run.sequence.size[..., 0]
        labels = call["labels"]
        if labels is not None:
            origin = run.sequence.origin
            labels = torch.where(origin > 0, labels.gather(1, (origin - 1).clamp(min=0)), -100)
        out = self._output(run.hidden, call["logits_to_keep"], labels, cache if use_cache else None)
        self.logit_rows = out.logits.shape[0] * out.logits.shape[1]
        return out

    def _decode(self, segments, input_ids, inputs_embeds, attention_mask, cache, logits_to_keep):
        hidden = self.language_model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self._output(self.engine.decode(segments, hidden, attention_mask, cache), logits_to_keep, None, cache)

    def output_class(self) -> type:
        """The output dataclass the unpatched forward returns."""
        raise NotImplementedError

    def _output(self, hidden: Tensor, logits_to_keep, labels: Tensor | None, cache):
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.model.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.model.loss_function(logits=logits, labels=labels,
                                            vocab_size=self.config.text_config.vocab_size)
        output_class = self.output_class()
        cache_field = "cache" if "cache" in {f.name for f in dataclasses.fields(output_class)} else "past_key_values"
        return output_class(loss=loss, logits=logits, **{cache_field: cache})

    # trace and FLOPs --------------------------------------------------------------------------------
    def _finish_trace(self, batch: int, lengths: list[tuple[int, int]], projector_record: LayerRecord,
                      llm: tuple[int, int] | None, tokens_per_sample: list[int] | None = None) -> None:
        trace = Trace(batch_size=batch, num_prefix=0, grid=None)
        if self.vision_trace is not None:
            trace.layers += self.vision_trace.layers
            trace.notes += self.vision_trace.notes
        trace.layers.append(projector_record)
        starts = [start for start, _ in lengths]
        for i in range(len(self.layers)):
            length = lengths[sum(start <= i for start in starts) - 1][1]
            previous = lengths[sum(start < i for start in starts) - 1][1] if i else length
            record = LayerRecord("llm", i, tokens_in=previous, tokens_attention=length, tokens_out=length)
            if llm is not None and i == llm[0]:
                record.reducer_flops = llm[1]
                record.tokens_per_image = tokens_per_sample
            trace.layers.append(record)
        self.trace = trace

    def llm_costs(self, layer: int) -> LayerCosts:
        decoder = self.layers[layer]
        attn = decoder.self_attn
        heads = self.language_model.config.num_attention_heads
        return LayerCosts(per_attention_token=linear_flops(attn, 1),
                          per_token_pair=attention_flops(1, heads, 1, 1, attn.head_dim),
                          per_mlp_token=linear_flops(decoder.mlp, 1))

    def add_vision_flops(self, report: FlopsReport) -> None:
        """Add the vision encoder's and projector's FLOPs of the last prefill to ``report``."""
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
            report.add("llm_prefill", f"layer{record.layer}", batch * costs.flops(record.tokens_out, record.tokens_out))
            if record.reducer_flops:
                report.add("llm_prefill", f"layer{record.layer}.reducer", record.reducer_flops)
            decode = costs.per_attention_token + costs.per_token_pair * (record.tokens_out + 1) + costs.per_mlp_token
            report.decode_per_token += batch * decode
        report.add("llm_prefill", "lm_head", linear_flops(self.model.lm_head, self.logit_rows))
        return report
