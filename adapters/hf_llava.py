"""Hugging Face LLaVA-family vision-language models (transformers 5.x):
``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration`` (AnyRes crops,
``image_newline`` tokens) and ``LlavaOnevisionForConditionalGeneration`` (images).

Stages:

- ``vision``: inside the CLIP / SigLIP tower (the :class:`~tokred.adapters.hf_vision.VisionTower`
  of the vision adapter), LLaVA-1.5 only: LLaVA-NeXT and OneVision lay the tower's output out on
  the crop grid (AnyRes packing, newline tokens), which needs every patch. Each image's remaining
  tokens fill the first slots of its placeholder run; the run's other placeholders are dropped.
- ``projector``: on each image's projected visual tokens (``plan_images``), before the language model.
- ``llm``: before decoder layer K, on the hidden states (``keep_mask``).

Whatever a stage removes, the adapter drops the matching placeholder tokens from the sequence
and keeps the attention mask, position ids (``positions="keep"`` or ``"renumber"``, an option of
the projector and llm reducers), labels and the KV cache consistent, sample by sample: samples are
left-padded again after pruning, so each sample is pruned by its own content alone.

The language model runs in tokred's own loop over the decoder layers whenever tokens were
removed: each group of layers between two prunings has its own attention mask, rotary table and
positions, and its cache entries are shorter than those of the layers before it. The same loop
serves prefill and every decode step (``generate`` works as usual); the bookkeeping travels with the
cache object. When nothing is removed the model's own forward runs, bit for bit.

Reducers decide on the prompt only. When a sequence that includes generated tokens is re-run
without a cache, pass ``prompt_length=`` (the prompt's length) to the model call so the decisions
match the cached run.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys

import torch
from torch import Tensor, nn

from tokred.adapters.base import Adapter, restore_class, swap_class
from tokred.adapters.hf_vision import ProjectionRowsMixin, VisionTower
from tokred.decoder import CompatibilityError, LanguageModelEngine, Rotary1D, Sequence, cache_keyword
from tokred.flops import FlopsReport, LayerCosts, attention_flops, linear_flops
from tokred.plan import sequence_plan
from tokred.reducers.base import Reducer, keeps_everything, kept_count
from tokred.reducers.baselines import Pool
from tokred.trace import LayerRecord, Trace

#: the image inputs ``get_image_features`` of the three families accept
_IMAGE_KWARGS = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
                 "batch_num_images")


def _families() -> dict[str, type]:
    """Supported model classes by name, or {} without transformers."""
    try:
        from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                                  LlavaOnevisionForConditionalGeneration)
    except ImportError:
        return {}
    return {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
            "llava_onevision": LlavaOnevisionForConditionalGeneration}


class PatchedForward:
    """The patched model's ``forward``: calls its adapter, and shows the class forward's signature
    (``generate`` inspects it). An object rather than a closure so that ``copy.deepcopy`` of the
    model gives a copy whose forward calls the copy's adapter."""

    def __init__(self, adapter: LlavaAdapter):
        self.adapter = adapter
        functools.update_wrapper(self, adapter.original_forward)

    def __call__(self, *args, **kwargs):
        return self.adapter.forward(*args, **kwargs)


class LlavaAdapter(Adapter):
    family = ("Hugging Face LLaVA family (transformers LlavaForConditionalGeneration, "
              "LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)")
    stages = ("vision", "projector", "llm")
    provides_heads = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if "transformers" not in sys.modules:
            return False
        return isinstance(model, tuple(_families().values()))

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        super().__init__(model, reducers)
        name = type(model).__name__
        self.kind = next(kind for kind, cls in _families().items() if isinstance(model, cls))
        base = model.model
        if reducers.get("vision") is not None and self.kind != "llava":
            raise ValueError(f"{name} packs the vision tower's patches on the AnyRes crop grid (with newline tokens), "
                             "which needs every patch: put the reducer at the 'projector' or 'llm' stage instead")
        self.engine = LanguageModelEngine(base.language_model, reducers.get("llm"), Rotary1D, name)
        self.language_model, self.layers = self.engine.language_model, self.engine.layers
        self.original_forward = type(model).forward.__get__(model)  # the class's, even while patched
        self.cache_keyword = cache_keyword(type(model).forward, f"{name}.forward")
        self.known_keywords = self._known_keywords()
        current = model.__dict__.get("_tokred_adapter")
        self.tower = VisionTower(base.vision_tower, reducers.get("vision"), on_end=self._tower_done,
                                 replaces=current.tower if isinstance(current, LlavaAdapter) else None)
        self.config = model.config
        projector = reducers.get("projector")
        if isinstance(projector, Pool) and self.image_grid() is None:
            raise ValueError(f"Pool at the projector stage needs each image's visual tokens to form the patch grid; "
                             f"{name}'s do not (AnyRes crops, newline tokens or the class token): use Random or "
                             "DivPrune there")
        if isinstance(getattr(projector, "keep", None), int) and self.image_grid() is not None:
            rows, cols = self.image_grid()
            kept_count(projector.keep, rows * cols)  # a count larger than an image's tokens
        self.projector = base.multi_modal_projector
        self.tower_trace: Trace | None = None
        self.projected_rows = 0  # visual features the projector ran on in the last prefill
        self.logit_rows = 0  # rows the LM head ran on in the last prefill

    # patching -------------------------------------------------------------------------------------
    def patch(self) -> None:
        self.tower.patch()
        swap_class(self.projector, ProjectionRowsMixin)
        self.projector._tokred_owner = self
        self.model.forward = PatchedForward(self)
        self.model._tokred_adapter = self

    def unpatch(self) -> None:
        self.tower.unpatch()
        restore_class(self.projector)
        del self.projector._tokred_owner
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

    def _tower_done(self, trace: Trace) -> None:
        self.tower_trace = trace

    @property
    def vision_stage(self):
        return self.tower.stage

    def layer_costs(self, layer: int) -> LayerCosts:
        return self.tower.layer_costs(layer)

    def image_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of an image's visual tokens when they form the patch grid (LLaVA-1.5, class token dropped)."""
        if self.kind != "llava" or self.config.vision_feature_select_strategy != "default":
            return None
        if not isinstance(self.config.vision_feature_layer, int):
            return None
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    # forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | Tensor = 0, prompt_length: int | None = None,
                **kwargs):
        unknown = sorted(set(kwargs) - self.known_keywords)
        if unknown:
            raise CompatibilityError(f"{type(self.model).__name__}.forward got keyword(s) {unknown} that tokred's "
                                     "LLaVA adapter does not know")
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
                    position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                    logits_to_keep=logits_to_keep, **kwargs, **{self.cache_keyword: cache})
        if pixel_values is None and encoded is None:  # text only, or a decode step of an unreduced prefill
            self._check_plain_cache(cache, input_ids if input_ids is not None else inputs_embeds, attention_mask)
            return self.original_forward(**call)
        if input_ids is None:
            raise ValueError("tokred needs input_ids (to find the image placeholders) when pixel_values are given")
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError("tokred does not reduce video inputs of LLaVA-OneVision yet; call tokred.remove(model)")
        return self._prefill(call, cache, encoded if encoded is not None else self._image_features(call),
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

    def _image_features(self, call: dict):
        """``get_image_features`` of the model on the call's images (its ``pooler_output``: per image features)."""
        base = self.model.model
        accepted = inspect.signature(base.get_image_features).parameters
        image_kwargs = {k: call[k] for k in _IMAGE_KWARGS if k in accepted and call.get(k) is not None}
        for name in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
            if name in accepted and name not in image_kwargs and hasattr(self.config, name):
                image_kwargs[name] = getattr(self.config, name)
        return base.get_image_features(pixel_values=call["pixel_values"], return_dict=True, **image_kwargs)

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

    def _projector(self, features: list[Tensor], counts: list[int], record: LayerRecord) -> list[tuple[Tensor, Tensor]]:
        """Per image, (kept slots among its placeholders, their features), after the projector reducer."""
        reducer = self.reducers.get("projector")
        out: list[tuple[Tensor, Tensor] | None] = [None] * len(features)
        by_length: dict[int, list[int]] = {}
        for i, f in enumerate(features):
            by_length.setdefault(f.shape[0], []).append(i)
        for length, images in by_length.items():
            stacked = torch.stack([features[i] for i in images])
            slots = torch.arange(length, device=stacked.device).expand(len(images), -1)
            if reducer is not None:
                grid = self.image_grid() if all(length == counts[i] for i in images) else None
                record.reducer_flops += reducer.overhead_flops(stacked)
                plan = reducer.plan_images(stacked, grid)
                if plan.merges:
                    size = stacked.new_ones(*stacked.shape[:2], 1)
                    stacked = plan.weighted_mean(stacked, size)[0]
                else:
                    stacked = plan.select(stacked)
                slots = plan.keep
            for j, i in enumerate(images):
                order = slots[j].argsort()  # features go to their slots in sequence order
                out[i] = (slots[j][order], stacked[j][order])
        return out

    def _surviving_tower_tokens(self, features: list[Tensor]) -> tuple[list[Tensor], list[int]]:
        """With a vision-stage reducer: each image's features cut to the tokens that survived in the
        tower (a batch is padded to its widest image; padding rows are no visual tokens), and the
        placeholders each image has (its unreduced token count)."""
        trace, tower_layers = self.tower_trace, len(self.tower.layers)
        class_token = int(self.config.vision_feature_select_strategy == "default")
        full = trace.layers[0].tokens_in - class_token
        if len(features) != trace.batch_size:
            raise ValueError(f"the language model received the features of {len(features)} images but the vision "
                             f"tower ran on {trace.batch_size}; with a vision-stage reducer generate() cannot "
                             "expand images for beam search or num_return_sequences > 1 (it counts placeholders "
                             "against the reduced features): use num_beams=1, or reduce at the projector stage")
        feature_layer = self.config.vision_feature_layer % (tower_layers + 1)  # hidden_states index
        if feature_layer == 0:
            return features, [full] * len(features)
        source_map = trace.source_maps[feature_layer - 1]  # (B, patches + class) -> token, -1 pruned
        alive = torch.zeros(source_map.shape[0], features[0].shape[0] + class_token, dtype=torch.bool,
                            device=source_map.device)
        alive.scatter_(1, source_map.clamp(min=0), source_map >= 0)
        alive = alive[:, class_token:]
        return [f[a] for f, a in zip(features, alive)], [full] * len(features)

    def _prefill(self, call: dict, cache, encoded, prompt_length: int | None):
        """A forward on a prompt with images: image features (``encoded``, the output of
        ``get_image_features``), the projector stage, then the language model."""
        input_ids, attention_mask = call["input_ids"], call["attention_mask"]
        batch, length = input_ids.shape
        embed = self.language_model.embed_tokens
        features = list(encoded.pooler_output)
        counts = [f.shape[0] for f in features]
        if self.reducers.get("vision") is not None and self.tower_trace is not None:
            features, counts = self._surviving_tower_tokens(features)
        runs = self._placeholders(input_ids, counts)
        record = LayerRecord("projector", 0, tokens_in=sum(counts), tokens_attention=sum(counts),
                             tokens_out=sum(counts))
        kept = self._projector(features, counts, record)
        record.tokens_out = sum(int(k[0].numel()) for k in kept)
        removed = record.tokens_out < record.tokens_in
        llm = self.reducers.get("llm")
        llm_acts = llm is not None and not keeps_everything(llm.keep)
        if not removed and not llm_acts:
            return self._unreduced(call, encoded, record)
        for flag in ("output_attentions", "output_hidden_states"):
            if call.get(flag):
                raise ValueError(f"{flag} is not supported while tokred removes tokens; call tokred.remove(model)")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("tokred starts a reduced prefill from an empty cache; got a cache that already holds "
                             f"{cache.get_seq_length()} tokens")

        embeds = embed(input_ids)
        keep = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
        visual = torch.zeros_like(keep)
        for (sample, positions), (slots, values) in zip(runs, kept):
            keep[sample, positions] = False
            visual[sample, positions[slots]] = True
            keep[sample, positions[slots]] = True
            embeds[sample, positions[slots]] = values.to(embeds.dtype)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(keep)
        positions = Rotary1D.prompt(valid, call["position_ids"])
        index = torch.arange(length, device=keep.device).expand(batch, -1)
        prompt = valid & (index < (length if prompt_length is None else prompt_length))
        seq = Sequence(embeds, positions, valid, visual, prompt, index + 1)
        next_position = Rotary1D.next_position(positions, valid)
        projector = self.reducers.get("projector")
        convention = projector.positions if projector is not None else "renumber"
        if removed:
            seq, next_position = seq.apply(sequence_plan(keep & valid), convention, next_position)
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

    def _output(self, hidden: Tensor, logits_to_keep, labels: Tensor | None, cache):
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.model.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.model.loss_function(logits=logits, labels=labels,
                                            vocab_size=self.config.text_config.vocab_size)
        module = sys.modules[type(self.model).__module__]
        output_class = getattr(module, type(self.model).__name__.replace("ForConditionalGeneration",
                                                                          "CausalLMOutputWithPast"))
        cache_field = "cache" if "cache" in {f.name for f in dataclasses.fields(output_class)} else "past_key_values"
        return output_class(loss=loss, logits=logits, **{cache_field: cache})

    # trace and FLOPs --------------------------------------------------------------------------------
    def _finish_trace(self, batch: int, lengths: list[tuple[int, int]], projector_record: LayerRecord,
                      llm: tuple[int, int] | None, tokens_per_sample: list[int] | None = None) -> None:
        trace = Trace(batch_size=batch, num_prefix=0, grid=None)
        if self.tower_trace is not None:
            trace.layers += self.tower_trace.layers
            trace.notes += self.tower_trace.notes
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

    def flops(self, trace: Trace) -> FlopsReport:
        """FLOPs of the last prefill by stage (``vision``, ``projector``, ``llm_prefill``) and of one
        decode step after it (``report.decode_per_token``: one new token per sample, with the cache the
        prefill left)."""
        report = FlopsReport(decode_per_token=linear_flops(self.model.lm_head, trace.batch_size))
        if self.tower_trace is not None:
            self.tower.add_flops(self.tower_trace, report)
            report.add("projector", "projector", linear_flops(self.model.model.multi_modal_projector,
                                                               self.projected_rows))
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
