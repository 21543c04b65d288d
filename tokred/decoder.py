"""The language-model stage: tokred's own loop over the decoder layers of a vision-language model.

Shared by every VLM family. transformers' decoder loop builds one causal mask and one rotary
table for all layers and derives positions and the cache length from layer 0 of the cache. After
an ``llm``-stage plan before layer K, layers from K on need their own mask, rotary embeddings and
positions, and their cache entries are shorter than those of the layers before K. So the loop
runs the layers as *segments* (runs of layers between two plans), each with its own additive
mask, positions and rotary table, never mutating shared tensors in place. The same loop serves
prefill and every decode step; its bookkeeping (the segments) travels with the cache object.

With :class:`~tokred.reducers.vtu.VTU` (DyMU's virtual token unmerging) the loop runs every layer's
norms, projections and MLP on the merged rows and its attention on the virtual full-length sequence
behind them (:class:`Unmerged`, which the adapter builds from the vision / projector merges).

An adapter gives the engine only what is family-specific: the language model (``embed_tokens``,
``layers``, ``norm``, ``rotary_emb``: Llama / Qwen2 / Mistral-style decoders), the visual tokens
in the :class:`Sequence` it builds, and a position scheme (:class:`Rotary1D` here).

**Never silently wrong.** Calling decoder layers leans on transformers internals that move (5.24
renamed the cache argument from ``past_key_values`` to ``cache``). :class:`LanguageModelEngine`
checks the layer signature it meets and raises :class:`CompatibilityError`, naming the installed
transformers, where a call cannot be accounted for. Every layer gets a 4-D additive float mask, which
eager and SDPA attention take; any other ``attn_implementation`` (FlashAttention, flex, paged, a
kernel from the Hub) is refused at ``apply`` (:meth:`LanguageModelEngine.check_attention`) and at
every step the loop runs.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from tokred.flops import linear_flops
from tokred.plan import Plan, follow, take
from tokred.reducers.base import Reducer
from tokred.reducers.vtu import remerge_plan
from tokred.signals import SequenceSignal


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _supported() -> str:
    """The transformers range tokred declares (its package metadata), for error messages."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        floors = {r.split(";")[0].strip() for r in requires("tokred") or [] if r.startswith("transformers")}
    except PackageNotFoundError:
        floors = set()
    return ", ".join(sorted(floors)) or "see tokred's README, 'Supported versions'"


class CompatibilityError(TypeError):
    """The installed transformers calls or builds the model in a way tokred was not written against."""

    def __init__(self, problem: str):
        super().__init__(f"{problem} (installed: transformers {transformers_version()}; tokred supports "
                         f"{_supported()}). tokred stops here rather than run on and give silently wrong "
                         "outputs: install a supported transformers release, or a tokred release that "
                         "supports yours; tokred.remove(model) runs the model unreduced")


def cache_keyword(function, what: str) -> str:
    """The keyword under which ``function`` takes the KV cache: ``cache`` (transformers >= 5.24)
    or ``past_key_values`` (before); a :class:`CompatibilityError` for anything else."""
    parameters = inspect.signature(function).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise CompatibilityError(f"{what} takes no `cache` / `past_key_values` argument, so tokred cannot keep "
                             "its KV cache consistent")


#: the attention implementations (``config._attn_implementation``) that take the loop's 4-D additive float
#: mask; None is what a standalone attention module runs: eager
SUPPORTED_ATTENTION = ("eager", "sdpa")

#: keyword arguments of the decoder layers that the loop passes (besides the cache)
_LAYER_KEYWORDS = ("attention_mask", "position_ids", "use_cache", "position_embeddings")
#: decoder layers (and their attention) whose forward VTU re-runs piece by piece: pre-norm, attention,
#: residual, post-attention norm, MLP, residual; q/k/v/o projections and the 1-D rotary of Llama
_UNMERGING_LAYERS = {"LlamaDecoderLayer": "LlamaAttention", "MistralDecoderLayer": "MistralAttention",
                     "Qwen2DecoderLayer": "Qwen2Attention", "Qwen2VLDecoderLayer": "Qwen2VLAttention",
                     "Qwen2_5_VLDecoderLayer": "Qwen2_5_VLAttention"}


def additive_mask(key_valid: Tensor, queries: int, dtype: torch.dtype, key_bias: Tensor | None = None) -> Tensor:
    """(B, 1, queries, K) additive mask: the last ``queries`` keys are the queries, causal, keys
    where ``key_valid`` (B, K) is False are masked, and ``key_bias`` (B, K) (log token sizes) is
    added to the allowed keys."""
    keys = key_valid.shape[1]
    query_pos = torch.arange(keys - queries, keys, device=key_valid.device)[:, None]
    allowed = (torch.arange(keys, device=key_valid.device)[None, :] <= query_pos)[None] & key_valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    if key_bias is not None:
        mask = mask + key_bias[:, None, :].to(dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


# positions ------------------------------------------------------------------------------------------

class Rotary1D:
    """1-D rotary positions (LLaVA's Llama / Qwen2 language models): one position id per token, (B, L)."""

    #: what ``positions=None`` on a reducer means for this scheme
    default_convention = "renumber"

    def convention(self, requested: str | None, model: str = "this model") -> str:
        """The position convention to use for a reducer's ``positions`` option (None: the scheme's default)."""
        return self.default_convention if requested is None else requested

    @staticmethod
    def prompt(valid: Tensor, position_ids: Tensor | None) -> Tensor:
        """(B, L) positions of a left-padded prompt: the given ones, else 0.. over the real tokens."""
        return position_ids if position_ids is not None else (valid.long().cumsum(dim=1) - 1).clamp(min=0)

    @staticmethod
    def next_position(positions: Tensor, valid: Tensor) -> Tensor:
        """(B,) position of the token after the last real one."""
        return torch.where(valid, positions, -1).amax(dim=1) + 1

    def renumber(self, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Contiguous positions of the real tokens after a plan, and the next position."""
        return (valid.long().cumsum(dim=1) - 1).clamp(min=0), valid.sum(dim=1)

    @staticmethod
    def decode(next_position: Tensor, queries: int) -> Tensor:
        """(B, queries) positions of the new tokens of a decode step."""
        return next_position[:, None] + torch.arange(queries, device=next_position.device)

    @staticmethod
    def rotary(positions: Tensor) -> Tensor:
        """What the language model's ``rotary_emb`` takes."""
        return positions

    @staticmethod
    def layer_positions(positions: Tensor) -> Tensor | None:
        """What the decoder layers take as ``position_ids``."""
        return positions


class MRoPE(Rotary1D):
    """3-D multimodal rotary positions (Qwen2-VL / Qwen2.5-VL): (t, h, w) per token, stored (B, L, 3).

    Removing visual tokens keeps every survivor's original (t, h, w) (``"keep"``, the default): the
    text after an image starts at the same position however many of its tokens remain, so gaps
    appear only inside the image's own grid. ``"renumber"`` has no faithful meaning here (it would
    flatten the image's 2-D layout and move the text) and is refused.
    """

    default_convention = "keep"

    def convention(self, requested: str | None, model: str = "this model") -> str:
        if requested == "renumber":
            self.renumber(None, model)
        return super().convention(requested, model)

    @staticmethod
    def prompt(valid: Tensor, position_ids: Tensor | None) -> Tensor:
        if position_ids is None or position_ids.dim() != 3 or position_ids.shape[-1] != 3:
            raise ValueError("M-RoPE prompt positions must be given as (B, L, 3)")
        return position_ids

    @staticmethod
    def next_position(positions: Tensor, valid: Tensor) -> Tensor:
        return torch.where(valid[..., None], positions, -1).amax(dim=(1, 2)) + 1

    def renumber(self, valid: Tensor, model: str = "this model") -> tuple[Tensor, Tensor]:
        raise ValueError(f"positions='renumber' has no faithful meaning for {model}'s 3-D M-RoPE positions (it "
                         "would flatten each image's (t, h, w) layout and move the text after it); use "
                         "positions='keep' (the default here), which keeps every token's original position")

    @staticmethod
    def decode(next_position: Tensor, queries: int) -> Tensor:
        return Rotary1D.decode(next_position, queries)[..., None].expand(-1, -1, 3)

    @staticmethod
    def rotary(positions: Tensor) -> Tensor:
        return positions.permute(2, 0, 1)  # (3, B, L)

    @staticmethod
    def layer_positions(positions: Tensor) -> Tensor | None:
        return None  # the layers use position_ids only for flash-attention packing, never the 3-D tensor


# the sequence and its segments ----------------------------------------------------------------------

@dataclass
class Unmerged:
    """The virtual full-length sequence behind a merged one, for VTU (:mod:`tokred.reducers.vtu`): the
    unreduced prompt, each of whose tokens is a copy of one row of the sequence."""

    rows: Tensor  # (B, N) row of the sequence each virtual token copies; -1: none (padding, a pruned token)
    positions: Tensor  # (B, N) or (B, N, 3) the virtual tokens' positions: the unreduced prompt's
    next_position: Tensor  # (B,) position id of the token after the unreduced prompt


@dataclass
class Segment:
    """Decoder layers ``first..`` (up to the next segment) and what their cache holds."""

    first: int
    valid: Tensor  # (B, cached tokens) real tokens in these layers' cache
    next_position: Tensor  # (B,) position id of the next token
    log_size: Tensor | None = None  # (B, cached tokens) attention bias of merged tokens, when proportional
    mask: Tensor | None = None
    position_embeddings: tuple[Tensor, Tensor] | None = None
    positions: Tensor | None = None


@dataclass
class Sequence:
    """The batch of left-padded sequences between plans, aligned token by token."""

    hidden: Tensor  # (B, L, C)
    positions: Tensor  # (B, L) position ids, or (B, L, 3) for M-RoPE
    valid: Tensor  # (B, L) real tokens
    visual: Tensor  # (B, L) visual tokens
    prompt: Tensor  # (B, L) tokens decisions may use
    origin: Tensor  # (B, L) 1 + index in the input sequence, 0 for padding
    size: Tensor | None = None  # (B, L, 1) input tokens each token stands for, once tokens merged
    unmerged: Unmerged | None = None  # the virtual sequence behind it, when VTU runs

    def apply(self, plan: Plan, positions: str, next_position: Tensor, scheme: Rotary1D) -> tuple[Sequence, Tensor]:
        """The sequence after ``plan`` (a left-padded plan over its tokens, e.g. from
        :func:`sequence_plan`), and the next position id per sample. Merged tokens take the
        size-weighted mean of their hidden states and the position of the token they merge into."""
        if plan.merges or self.size is not None:
            size = self.size if self.size is not None else self.valid[..., None].to(self.hidden.dtype)
            hidden, size = plan.weighted_mean(self.hidden, size)
        else:
            hidden, size = plan.select(self.hidden), None
        valid = plan.select(self.valid)
        if positions == "renumber":
            new_positions, next_position = scheme.renumber(valid)
        else:
            new_positions = plan.select(self.positions)
        unmerged = None if self.unmerged is None else replace(self.unmerged, rows=follow(self.unmerged.rows, plan))
        return Sequence(hidden, new_positions, valid, plan.select(self.visual), plan.select(self.prompt),
                        plan.select(self.origin), size, unmerged), next_position


def last_prompt_token(prompt: Tensor) -> Tensor:
    """(B,) index of the last True entry of each row of ``prompt`` (B, L)."""
    positions = torch.arange(prompt.shape[1], device=prompt.device)
    return torch.where(prompt, positions, -1).amax(dim=1)


# the engine -----------------------------------------------------------------------------------------

@dataclass
class Prefill:
    """What a prefill through the engine leaves: final-normed hidden states, the sequence they
    belong to, the segments (also on the cache), per-layer lengths and, per plan, the llm reducer's
    FLOPs and the tokens per sample after it."""

    hidden: Tensor
    sequence: Sequence
    segments: list[Segment]
    lengths: list[tuple[int, int]]
    attention_length: int | None = None  # N, when attention ran on a virtual sequence (VTU)
    #: per decoder layer K a plan acted before: (the reducer's FLOPs there, tokens per sample after it)
    plans: dict[int, tuple[int, list[int]]] = field(default_factory=dict)


class LanguageModelEngine:
    """Runs a Llama / Qwen2-style decoder (``language_model``: ``layers``, ``norm``,
    ``rotary_emb``) layer by layer with one optional ``llm``-stage reducer.

    The constructor only checks (a :class:`CompatibilityError` when a decoder layer's signature is
    not the one the loop calls); the adapter calls :meth:`check_attention` at ``apply``.
    """

    def __init__(self, language_model: nn.Module, reducer: Reducer | None, scheme: Rotary1D, name: str = "model"):
        for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(language_model, part):
                raise TypeError(f"{name}'s language model ({type(language_model).__name__}) has no `{part}`; "
                                "tokred supports Llama / Qwen2 / Mistral-style decoders")
        text_config = language_model.config
        if any(kind != "full_attention" for kind in getattr(text_config, "layer_types", None) or []):
            raise TypeError(f"{name}'s language model has sliding-window layers, which tokred does not support")
        self.language_model, self.layers, self.scheme = language_model, list(language_model.layers), scheme
        self.name = name
        self.reducer = reducer
        if reducer is not None:
            reducer.check(len(self.layers))
        self.cache_keyword = self._check_layers(name)
        self.unmerges = reducer is not None and getattr(reducer, "unmerges", False)
        if self.unmerges:
            self._check_unmerging(name)

    def check_attention(self, after_apply: bool = False) -> None:
        """A ``ValueError`` unless every decoder layer's attention runs an implementation that takes the
        loop's 4-D additive float mask (:data:`SUPPORTED_ATTENTION`). Run at ``apply`` when a reducer is
        applied (without one the loop never runs) and, cheaply, at every prefill and decode step the loop
        runs (``after_apply``: the backend was switched since)."""
        met = {}
        for i, layer in enumerate(self.layers):
            config = getattr(getattr(layer, "self_attn", None), "config", self.language_model.config)
            implementation = getattr(config, "_attn_implementation", None)
            if implementation not in (None, *SUPPORTED_ATTENTION):
                met.setdefault(implementation, []).append(i)
        if not met:
            return
        found = "; ".join(f"{name!r} in decoder layer(s) {layers}" for name, layers in met.items())
        when = "was switched after tokred.apply to" if after_apply else "runs"
        otherwise = "; tokred.remove(model) runs it unreduced" if after_apply else ""
        raise ValueError(f"{self.name}'s language model {when} {found}. tokred's language-model loop hands every "
                         "decoder layer a 4-D additive float mask (padding, causality, log-size bias), which only "
                         f"these attention implementations take: {', '.join(SUPPORTED_ATTENTION)}. Switch with "
                         "model.set_attn_implementation('sdpa') (a dict such as {'text_config': 'sdpa'} switches the "
                         f"language model only; tokred's vision stages run on any){otherwise}")

    def _check_layers(self, name: str) -> str:
        keywords = {cache_keyword(type(layer).forward, f"{name}'s decoder layer {type(layer).__name__}")
                    for layer in self.layers}
        for layer in self.layers:
            parameters = inspect.signature(type(layer).forward).parameters
            missing = [k for k in _LAYER_KEYWORDS if k not in parameters]
            if missing or list(parameters)[1] != "hidden_states" or len(keywords) != 1:
                raise CompatibilityError(f"{name}'s decoder layer {type(layer).__name__} has the signature "
                                         f"{inspect.signature(type(layer).forward)}, not the one tokred's decoder "
                                         f"loop calls (hidden_states, {', '.join(_LAYER_KEYWORDS)}, cache)")
        return keywords.pop()

    def _check_unmerging(self, name: str) -> None:
        """VTU runs the decoder layers piece by piece (:meth:`_unmerged_layer`): a
        :class:`CompatibilityError` unless every layer is one it was written against."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        for layer in self.layers:
            attn = getattr(layer, "self_attn", None)
            parts = ("input_layernorm", "post_attention_layernorm", "mlp")
            projections = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            module = sys.modules[type(attn).__module__]
            if (_UNMERGING_LAYERS.get(type(layer).__name__) != type(attn).__name__
                    or not all(hasattr(layer, p) for p in parts)
                    or not all(isinstance(p, nn.Linear) for p in projections)
                    or any(getattr(attn, p, None) is not None for p in ("q_norm", "k_norm", "sliding_window"))
                    or not all(hasattr(attn, p) for p in ("head_dim", "scaling", "layer_idx"))
                    or not all(hasattr(module, f) for f in ("apply_rotary_pos_emb", "eager_attention_forward"))
                    or not hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface")):
                raise CompatibilityError(
                    f"VTU re-runs {name}'s decoder layers piece by piece and knows the layers "
                    f"{sorted(_UNMERGING_LAYERS)} with q/k/v/o projections and the 1-D rotary helper; it met "
                    f"{type(layer).__name__} with {type(attn).__name__}")

    # one segment, one layer -------------------------------------------------------------------------
    def _segment_inputs(self, segment: Segment, hidden: Tensor, queries: int, positions: Tensor) -> None:
        segment.mask = additive_mask(segment.valid, queries, hidden.dtype, segment.log_size)
        segment.positions = self.scheme.layer_positions(positions)
        segment.position_embeddings = self.language_model.rotary_emb(hidden, self.scheme.rotary(positions))

    def _layer(self, i: int, hidden: Tensor, segment: Segment, cache) -> Tensor:
        return self.layers[i](hidden, attention_mask=segment.mask, position_ids=segment.positions,
                              use_cache=True, position_embeddings=segment.position_embeddings,
                              **{self.cache_keyword: cache})

    @staticmethod
    def _release(segments: list[Segment]) -> None:
        for s in segments:
            s.mask = s.position_embeddings = s.positions = None

    # prefill ----------------------------------------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.language_model.config)

    def prefill(self, seq: Sequence, next_position: Tensor, cache, keep_cache: bool) -> Prefill:
        """Run every decoder layer on ``seq`` (the reducer acting before its layers K); with
        ``keep_cache`` the segments ride on ``cache`` for the decode steps."""
        self.check_attention(after_apply=True)
        if self.unmerges:
            return self._prefill_unmerged(seq, cache, keep_cache)
        reducer = self.reducer
        if reducer is not None and (reducer.needs_keys or reducer.needs_last_attention or reducer.needs_attention):
            self._check_no_checkpointing()
        segment = Segment(0, seq.valid, next_position)
        self._segment_inputs(segment, seq.hidden, seq.hidden.shape[1], seq.positions)
        segments, lengths = [segment], [(0, seq.hidden.shape[1])]
        hidden, plans = seq.hidden, {}
        entering = hidden  # the input of the previous layer (FastV's query row comes from it)
        plan_layers = reducer.decoder_layers() if reducer is not None else ()
        for i in range(len(self.layers)):
            if i in plan_layers:
                seq, next_position, flops = self._reduce(i, replace(seq, hidden=hidden), entering, segment, cache)
                hidden = seq.hidden
                log_size = None
                if reducer.proportional_attention and seq.size is not None:
                    log_size = seq.size[..., 0].clamp_min(1).log()  # padding (size 0) is masked anyway
                segment = Segment(i, seq.valid, next_position, log_size)
                self._segment_inputs(segment, hidden, hidden.shape[1], seq.positions)
                segments.append(segment)
                lengths.append((i, hidden.shape[1]))
                plans[i] = (flops, seq.valid.sum(dim=1).tolist())
            entering = hidden
            hidden = self._layer(i, hidden, segment, cache)
        self._release(segments)
        if keep_cache:
            cache._tokred = segments
        return Prefill(self.language_model.norm(hidden), seq, segments, lengths, plans=plans)

    def _check_no_checkpointing(self) -> None:
        """Refuse gradient checkpointing (a layer recomputed in the backward pass runs without the
        cache): the reducer's signal comes from the keys the decoder layers cached."""
        if torch.is_grad_enabled() and any(getattr(layer, "gradient_checkpointing", False) and layer.training
                                           for layer in self.layers):
            raise ValueError(f"{type(self.reducer).__name__} reads the keys the decoder layers cache, and gradient "
                             "checkpointing runs them without a cache: disable it with "
                             "model.gradient_checkpointing_disable(), or run without gradients (torch.no_grad(), "
                             "model.eval())")

    def _prefill_unmerged(self, seq: Sequence, cache, keep_cache: bool) -> Prefill:
        """VTU's prefill: every decoder layer with its attention on the virtual sequence
        ``seq.unmerged`` (:meth:`_unmerged_layer`). The cache then holds the N virtual tokens' keys and
        values, so decode steps are ordinary steps of one segment over the virtual sequence."""
        if seq.unmerged is None:
            raise RuntimeError("VTU needs the virtual sequence of the unreduced prompt, which the adapter did not give")
        rows, hidden = seq.unmerged.rows, seq.hidden
        segment = Segment(0, rows >= 0, seq.unmerged.next_position)
        self._segment_inputs(segment, hidden, rows.shape[1], seq.unmerged.positions)
        remerge = remerge_plan(rows, hidden.shape[1])
        for i in range(len(self.layers)):
            hidden = self._unmerged_layer(i, hidden, segment, rows.clamp(min=0), remerge, cache)
        self._release([segment])
        if keep_cache:
            cache._tokred = [segment]
        return Prefill(self.language_model.norm(hidden), seq, [segment], [(0, hidden.shape[1])],
                       attention_length=rows.shape[1])

    def _unmerged_layer(self, i: int, hidden: Tensor, segment: Segment, copies: Tensor, remerge: Plan,
                        cache) -> Tensor:
        """Decoder layer ``i`` under VTU: norms, q/k/v/o projections and the MLP on the n rows of
        ``hidden``; q, k, v copied to the N virtual tokens (``copies``: (B, N) row of each), rotated at
        their virtual positions and cached; the model's own attention (eager or SDPA) over the virtual
        sequence; each row's output the mean of its virtual tokens' (``remerge``)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        layer = self.layers[i]
        attn = layer.self_attn
        module = sys.modules[type(attn).__module__]
        batch, num_rows = hidden.shape[:2]
        x = layer.input_layernorm(hidden)
        q, k, v = (take(p(x).view(batch, num_rows, -1, attn.head_dim), copies).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = module.apply_rotary_pos_emb(q, k, *segment.position_embeddings)
        k, v = cache.update(k, v, attn.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                          module.eager_attention_forward)
        out = attention(attn, q, k, v, segment.mask, dropout=attn.attention_dropout if attn.training else 0.0,
                        scaling=attn.scaling)[0]  # (B, N, H, D)
        virtual = segment.valid[..., None].to(out.dtype)
        out = remerge.weighted_mean(out.reshape(batch, copies.shape[1], -1), virtual)[0]
        hidden = hidden + attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _reduce(self, layer: int, seq: Sequence, entering: Tensor, segment: Segment,
                cache) -> tuple[Sequence, Tensor, int]:
        """The reducer's plan before decoder ``layer``: the new sequence, next positions and its FLOPs."""
        reducer = self.reducer
        signal = SequenceSignal(self.language_model.norm(seq.hidden), seq.visual, seq.valid, seq.prompt,
                                sizes=seq.size, layer=layer, residual=seq.hidden)
        flops = 0
        if reducer.needs_keys:
            signal.keys = cache.layers[layer - 1].keys
        if reducer.needs_last_attention:
            signal.last_attention, flops = self.last_attention(layer - 1, entering, segment, cache, seq)
        if reducer.needs_attention:
            every = torch.arange(seq.valid.shape[1], device=seq.valid.device).expand(seq.valid.shape[0], -1)
            signal.attention, flops = self.attention_rows(layer - 1, entering, segment, cache, seq, every)
        plan = reducer.plan_sequence(signal)
        length = seq.valid.shape[1]
        kept = torch.zeros(seq.valid.shape[0], length + 1, dtype=torch.bool, device=seq.valid.device)
        kept = kept.scatter_(1, plan.keep, True)[:, :length]
        if bool((~kept & ~seq.visual & seq.valid).any()):
            raise RuntimeError(f"{type(reducer).__name__} removed or merged a text token; only visual tokens may go")
        flops += reducer.overhead_flops(signal)
        seq, next_position = seq.apply(plan, self.scheme.convention(reducer.positions), segment.next_position,
                                       self.scheme)
        return seq, next_position, flops

    def last_attention(self, layer: int, entering: Tensor, segment: Segment, cache, seq: Sequence):
        """Attention of each sample's last prompt token over all tokens at decoder layer ``layer``
        (averaged over heads), from that one query row and the layer's cached keys; and its FLOPs."""
        rows, flops = self.attention_rows(layer, entering, segment, cache, seq, last_prompt_token(seq.prompt)[:, None])
        return rows[:, 0], flops

    def attention_rows(self, layer: int, entering: Tensor, segment: Segment, cache, seq: Sequence,
                       queries: Tensor) -> tuple[Tensor, int]:
        """(B, Q, L) attention the tokens at ``queries`` (B, Q) give every token at decoder layer
        ``layer`` (averaged over heads; causal, padding masked), from their queries and the layer's
        cached keys; and its FLOPs."""
        decoder = self.layers[layer]
        attn = decoder.self_attn
        batch, count = queries.shape
        rows = torch.arange(batch, device=entering.device)[:, None]
        x = decoder.input_layernorm(entering[rows, queries])
        q = attn.q_proj(x).view(batch, count, -1, attn.head_dim).transpose(1, 2)  # (B, H, Q, D)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        cos, sin = (t[rows, queries] for t in segment.position_embeddings)  # (B, Q, D)
        apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the attention's own rotary
        q = apply_rotary(q, q, cos, sin)[0]
        keys = cache.layers[layer].keys
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
        logits = (q @ keys.transpose(-1, -2)) * attn.scaling  # (B, H, Q, L)
        if segment.log_size is not None:
            logits = logits + segment.log_size[:, None, None]
        positions = torch.arange(keys.shape[2], device=keys.device)
        allowed = seq.valid[:, None] & (positions[None, None] <= queries[..., None])  # (B, Q, L)
        logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
        attention = logits.softmax(dim=-1).mean(dim=1)
        flops = linear_flops(attn.q_proj, batch * count) + 2 * batch * q.shape[1] * count * keys.shape[2] * attn.head_dim
        return attention, flops

    # decode -----------------------------------------------------------------------------------------
    @staticmethod
    def _follow_crops(segments: list[Segment], cache) -> None:
        """Forget, in each segment, the last tokens its layers' cache no longer holds: ``cache.crop(-n)``
        removes the n newest tokens of every layer (assisted decoding, after rejected drafts), which
        are the n newest decoded tokens of every segment. A cache holding more tokens than the
        segments know was extended without tokred (a :class:`CompatibilityError`)."""
        for segment in segments:
            cached, known = cache.layers[segment.first].keys.shape[-2], segment.valid.shape[1]
            if cached > known:
                raise CompatibilityError(f"decoder layer {segment.first}'s cache holds {cached} tokens where tokred's "
                                         f"bookkeeping knows {known}: it was extended outside tokred's decode steps")
            if cached < known:
                segment.valid = segment.valid[:, :cached]
                if segment.log_size is not None:
                    segment.log_size = segment.log_size[:, :cached]
                segment.next_position = segment.next_position - (known - cached)

    def decode(self, segments: list[Segment], hidden: Tensor, attention_mask: Tensor | None, cache,
               positions: Tensor | None = None) -> Tensor:
        """One decode step of ``hidden`` (B, queries, C) new tokens on a cache left by :meth:`prefill`;
        returns the final-normed hidden states. The new tokens take ``positions`` (the scheme's layout)
        when the caller gives them (the ones the unpatched model would use), else the segments' next ones."""
        self.check_attention(after_apply=True)
        batch, queries = hidden.shape[:2]
        new_valid = (attention_mask[:, -queries:].bool() if attention_mask is not None
                     else torch.ones(batch, queries, dtype=torch.bool, device=hidden.device))
        self._follow_crops(segments, cache)
        for segment in segments:
            segment.valid = torch.cat([segment.valid, new_valid], dim=1)
            if segment.log_size is not None:
                segment.log_size = torch.cat([segment.log_size, segment.log_size.new_zeros(batch, queries)], dim=1)
            step = self.scheme.decode(segment.next_position, queries) if positions is None else positions
            segment.next_position = segment.next_position + queries
            self._segment_inputs(segment, hidden, queries, step)
        starts = [s.first for s in segments]
        for i in range(len(self.layers)):
            segment = segments[sum(start <= i for start in starts) - 1]
            hidden = self._layer(i, hidden, segment, cache)
        self._release(segments)
        return self.language_model.norm(hidden)
