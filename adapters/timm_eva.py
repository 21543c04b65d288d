"""timm ``Eva`` family: EVA, EVA-02 and the RoPE ViTs built on it (timm's SBB RoPE ViTs, Naver's
RoPE-ViT with axial or mixed rotary embeddings, DINOv3) — pre-norm ``EvaBlock`` with ``EvaAttention``.

Hook point: every ``EvaBlock``, after attention and before the MLP, as for timm's ViT
(``tokred.adapters.timm_vit``): attention stays on ``F.scaled_dot_product_attention`` with
proportional attention as an additive float mask, the class and register tokens are protected
and stay in front, LayerScale (``gamma_1``/``gamma_2``), q/k norm, the inner attention norm,
gated attention and SwiGLU / normformer MLPs are the model's own modules. Whenever a block
changes nothing, timm's own block forward runs, so every identity setting is bit-identical to
the unpatched model. Pooling (``avg``, ``avgmax``, ``max``, ``map``) weighs every token by the
number of patches it stands for.

**Rotary embeddings follow the tokens.** Eva hands every block ``rope``: one sin/cos row per
patch token of the full grid (prefix tokens have none), shared by the images ((N, D); mixed
RoPE: (heads, N, D) per block; with patch dropout already per image). Once a plan has reduced
the tokens, each token's row is gathered from the rows of the tokens that entered block 0:

* a kept (or pruned-around) token keeps its own row;
* **a merged token keeps its destination's row** — the row of the token its sources were folded
  into (over several blocks: of the token that survived every merge). This is tokred's choice:
  token merging has no canonical rule for RoPE ViTs (no source of ToMe addresses them), and
  keeping the destination's row leaves every survivor's rotation exactly what the model was
  trained with, where averaging angles of distant patches would create positions that exist
  nowhere on the grid. Pooling (``tokred.Pool``) merges each window into its first patch, so
  the pooled token takes that patch's row.

Images reduced to different counts get per-image rows, (B, 1, N', D) (mixed: (B, heads, N', D)),
instead of the shared table, so a batch computes exactly what each image computes alone.

**The merge metric** is the keys averaged over heads *before* the rotary embedding (after q/k
norm): the rotation depends on the position only, so rotated keys of two patches with the same
content differ with their distance and similarity would mix content with layout. Reducers that
need the attention itself (``Thresholds``: attention received) get the rotated queries and
keys, the ones the attention used.

Refused with a clear error: ``EvaBlockPostNorm`` (``use_post_norm=True``), timm's
``AttentionRope`` (``attn_type='rope'``: Perception Encoder, Sapiens2), blocks or attention
modules with parts this adapter was not written against, and reducing with an attention mask,
causal attention or gradient checkpointing.

timm versions (1.0.20, the floor, to 1.0.31): what this adapter relies on moved in 1.0.21
(``apply_rot_embed_cat`` splits with ``chunk``, later casts to the input's dtype: tokred calls
timm's own), 1.0.26 (``is_causal`` in the block, attention and ``forward_features`` signatures,
passed on only when set; ``EvaAttention.head_dim``, absent before, so FLOPs use
``proj.in_features``), 1.0.28 (gated attention, ``attn.gate``), 1.0.30 (attention-only LayerScale:
``gamma_2`` may be None while ``gamma_1`` is not; grouped-query heads, ``AttentionRope`` only)
and 1.0.31 (MRoPE). Before 1.0.31, mixed RoPE computes its table with matmuls, which
``FlopCounterMode`` counts: the FLOPs report adds them as ``rope``. The constructor checks the
block and attention against the parts and forward arguments listed here and names the timm
version when it meets others.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokred.adapters.base import Adapter, inherits_method, original_class, original_method, patch_module
from tokred.adapters.refused import refuse
from tokred.adapters.timm_vit import TimmViTAdapter, _mask_kwargs, _ViTMixin, attention_core
from tokred.engine import TokenRun, VisionStage, weight_bias, weighted_mean
from tokred.flops import LayerCosts, attention_flops, linear_flops
from tokred.plan import Plan
from tokred.reducers.base import Reducer
from tokred.signals import Heads

POOLS = ("", "token", "avg", "avgmax", "max", "map")
#: what tokred's re-implementation of ``EvaBlock`` / ``EvaAttention`` reads; a block or attention with
#: any other sub-module or parameter (a newer timm, a subclass) is refused rather than run without it
BLOCK_PARTS = {"norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2", "drop_path2"}
ATTENTION_PARTS = {"qkv", "q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm",
                   "attn_drop", "norm", "gate", "proj", "proj_drop"}
ATTENTION_ATTRIBUTES = ("num_heads", "scale", "num_prefix_tokens", "fused_attn", "qkv_bias_separate")
FORWARD_ARGUMENTS = {"x", "rope", "attn_mask", "is_causal"}  # is_causal: timm >= 1.0.26


@dataclass
class RopeHeads(Heads):
    """:class:`~tokred.signals.Heads` of a rotary attention: ``q``/``k`` as the attention used them
    (rotated), ``content_keys`` before the rotation; :meth:`mean_keys` (the merge metric) averages
    the latter."""

    content_keys: Tensor | None = None

    def mean_keys(self) -> Tensor:
        return (self.k if self.content_keys is None else self.content_keys).mean(dim=1)


def _parts(module: nn.Module) -> set[str]:
    """Names of ``module``'s own sub-modules, parameters and buffers."""
    return {name for named in (module.named_children(), module.named_parameters(recurse=False),
                               module.named_buffers(recurse=False)) for name, _ in named}


def _timm_version() -> str:
    import timm

    return timm.__version__


def gather_rope(rope: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (B, M) of a rotary table whose second-to-last axis runs over the patch tokens:
    (N, D) or (heads, N, D) shared by the images, or (B, 1 or heads, N, D) per image. Returns
    (B, 1 or heads, M, D), which broadcasts against per-head queries (B, heads, M, D)."""
    if rope.dim() == 2:
        rope = rope[None, None]
    elif rope.dim() == 3:
        rope = rope[None]
    batch, count = index.shape
    rope = rope.expand(batch, -1, -1, -1)
    index = index[:, None, :, None].expand(batch, rope.shape[1], count, rope.shape[-1])
    return rope.gather(2, index)


def eva_attention(attn: nn.Module, x: Tensor, rope: Tensor | None, bias: Tensor | None,
                  need_heads: bool) -> tuple[Tensor, RopeHeads | None]:
    """timm ``EvaAttention.forward`` with an additive ``bias``, also returning its queries and keys
    (rotated, and the keys before the rotation). ``rope`` as ``EvaAttention`` takes it, or per image."""
    from timm.models import eva

    batch, num_tokens, _ = x.shape
    heads = attn.num_heads
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(batch, num_tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (proj(x).reshape(batch, num_tokens, heads, -1).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = attn.q_norm(q), attn.k_norm(k)
    content_keys = k
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q, k = (torch.cat([t[:, :, :npt], eva.apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2).type_as(v)
                for t in (q, k))
    x = attention_core(attn, q, k, v, bias, gate)
    return x, (RopeHeads(q, k, attn.scale, bias, content_keys=content_keys) if need_heads else None)


class RopeTokenRun(TokenRun):
    """A :class:`TokenRun` that also carries, per token, the index of the token entering block 0
    whose rotary row it uses (``positions``, (B, N); None while nothing was reduced): a plan's
    ``keep`` picks them, so a merged token keeps its destination's row."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.positions: Tensor | None = None

    def apply(self, plan: Plan, x: Tensor) -> Tensor:
        if self.positions is None:
            self.positions = torch.arange(plan.num_inputs, device=x.device).expand(x.shape[0], -1)
        self.positions = plan.select(self.positions)  # padding outputs get 0: a prefix row, clamped below
        return super().apply(plan, x)


class RopeStage(VisionStage):
    """A :class:`VisionStage` whose runs are :class:`RopeTokenRun`."""

    def begin(self, batch: int, grid: tuple[int, int] | None) -> None:
        self.run = RopeTokenRun(batch, self.num_prefix, grid)


class _EvaBlockMixin:
    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        adapter = self._tokred_adapter
        if adapter.stage.run is None:  # called outside Eva.forward_features
            return super().forward(x, rope=rope, **_mask_kwargs(attn_mask, is_causal))
        return adapter.block_forward(self, x, rope, attn_mask, is_causal)


class TimmEvaAdapter(TimmViTAdapter):
    family = ("timm Eva (EVA, EVA-02, RoPE ViTs such as DINOv3; pre-norm EvaBlock with EvaAttention, "
              "rotary embeddings gathered with the tokens)")
    stages = ("vision",)
    provides_heads = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        refuse(model)  # NaFlexViT and Swin: a TypeError saying why
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        Adapter.__init__(self, model, reducers)  # not TimmViTAdapter's checks: those are for VisionTransformer
        from timm.models.eva import Eva, EvaAttention, EvaBlock

        for name in ("forward_features", "_pos_embed", "pool", "forward_head"):
            if not inherits_method(model, Eva, name):
                raise TypeError(f"{original_class(model).__name__} overrides Eva.{name}; tokred's Eva adapter "
                                "supports timm's own Eva")
        for i, block in enumerate(model.blocks):
            self._check_block(i, block, EvaBlock, EvaAttention, model.num_prefix_tokens)
        if model.global_pool not in POOLS:
            raise ValueError(f"global_pool='{model.global_pool}' is not supported; supported: {POOLS}")
        self.num_prefix = model.num_prefix_tokens
        self.stage = RopeStage(reducers.get("vision"), len(model.blocks), self.num_prefix)
        self.head_mode = None
        self.feature_sizes = {}
        self.rope_table_flops: dict[tuple[int, int], int] = {}  # grid -> FLOPs of computing the rotary table

    @staticmethod
    def _check_block(i: int, block: nn.Module, block_class: type, attention_class: type, num_prefix: int) -> None:
        version = _timm_version()
        kind = original_class(block).__name__
        if kind == "EvaBlockPostNorm":
            raise TypeError(f"block {i} is an EvaBlockPostNorm (use_post_norm=True); tokred's Eva adapter supports "
                            "pre-norm EvaBlock blocks")
        if not issubclass(original_class(block), block_class) or not inherits_method(block, block_class, "forward"):
            raise TypeError(f"block {i} is a {kind}; tokred's Eva adapter supports timm's EvaBlock")
        attn = block.attn
        if type(attn).__name__ == "AttentionRope":
            raise TypeError(f"block {i} uses timm's AttentionRope (attn_type='rope': Perception Encoder, Sapiens2); "
                            "tokred's Eva adapter supports EvaAttention (attn_type='eva')")
        if not isinstance(attn, attention_class) or not inherits_method(attn, attention_class, "forward"):
            raise TypeError(f"block {i} uses {type(attn).__name__}; tokred's Eva adapter supports timm's EvaAttention")
        unknown = sorted(_parts(block) - BLOCK_PARTS) + [f"attn.{name}" for name in sorted(_parts(attn) - ATTENTION_PARTS)]
        missing = [f"attn.{name}" for name in ATTENTION_ATTRIBUTES if not hasattr(attn, name)]
        arguments = set(inspect.signature(block_class.forward).parameters) - {"self"}
        arguments |= set(inspect.signature(attention_class.forward).parameters) - {"self"}
        if unknown or missing or not arguments <= FORWARD_ARGUMENTS:
            details = ", ".join(unknown + [f"no {m}" for m in missing] +
                                [f"forward argument {a}" for a in sorted(arguments - FORWARD_ARGUMENTS)])
            raise TypeError(f"block {i}: this EvaBlock / EvaAttention of timm {version} has parts tokred's Eva adapter "
                            f"was not written against ({details}); it supports timm 1.0.20 to 1.0.31 — please "
                            "report the timm version")
        if attn.num_prefix_tokens != num_prefix:
            raise TypeError(f"block {i}: its attention leaves {attn.num_prefix_tokens} prefix tokens out of the rotary "
                            f"embedding but the model has {num_prefix}")

    # patching -----------------------------------------------------------------------------
    def patch(self) -> None:
        patch_module(self.model, _ViTMixin, self)
        for i, block in enumerate(self.model.blocks):
            patch_module(block, _EvaBlockMixin, self, layer=i)

    # forward ------------------------------------------------------------------------------
    def running(self, images: Tensor):
        model = self.model
        if self.stage.reducer is not None and model.grad_checkpointing and torch.is_grad_enabled():
            raise ValueError("tokred cannot reduce tokens with gradient checkpointing on (the recomputed blocks "
                             "would not see the reduction); call model.set_grad_checkpointing(False) or run "
                             "without gradients")
        if model.patch_drop is not None and model.training:  # patches were dropped: no full grid
            self.head_mode = None
            return self.stage.running(images.shape[0], None, on_end=self.set_trace)
        return super().running(images)

    def rope_rows(self, rope: Tensor | None, run: RopeTokenRun) -> Tensor | None:
        """The rotary table for the current tokens: ``rope`` itself until a plan reduced them, then
        each token's row (:func:`gather_rope`)."""
        if rope is None or run.positions is None:
            return rope
        entering = run.source_map.shape[1] - self.num_prefix  # patch tokens that entered block 0
        if rope.shape[-2] != entering:
            raise ValueError(f"the rotary embedding has {rope.shape[-2]} rows but {entering} patch tokens entered "
                             f"the first block (timm {_timm_version()}); tokred's Eva adapter expects one row per "
                             "patch token")
        return gather_rope(rope, (run.positions[:, self.num_prefix:] - self.num_prefix).clamp_min(0))

    def block_forward(self, block: nn.Module, x: Tensor, rope: Tensor | None, attn_mask: Tensor | None,
                      is_causal: bool) -> Tensor:
        if (attn_mask is not None or is_causal) and self.stage.reducer is not None:
            raise ValueError("tokred cannot reduce tokens when an attention mask or causal attention is "
                             "passed to the Eva blocks")
        run = self.stage.run

        def attend(x, bias, need_heads):
            y, heads = eva_attention(block.attn, block.norm1(x), self.rope_rows(rope, run), bias, need_heads)
            if block.gamma_1 is not None:
                y = block.gamma_1 * y
            return block.drop_path1(y), heads

        def feed_forward(x):
            y = block.mlp(block.norm2(x))
            if block.gamma_2 is not None:
                y = block.gamma_2 * y
            return block.drop_path2(y)

        return self.stage.block(
            block._tokred_layer, x, attend, feed_forward,
            original=lambda x: original_method(block)(x, rope=self.rope_rows(rope, run),
                                                      **_mask_kwargs(attn_mask, is_causal)))

    def weighted_pool(self, x: Tensor, pool_type: str | None, size: Tensor) -> Tensor:
        """``Eva.pool`` with every token weighted by its ``size`` (B, N, 1): the attention pool over all
        tokens gets log(size) as a mask, the average / max pools leave the prefix tokens out."""
        model = self.model
        if model.attn_pool is not None:
            return model.attn_pool(x, attn_mask=weight_bias(size[..., 0]))
        pool_type = model.global_pool if pool_type is None else pool_type
        if pool_type in ("token", ""):
            return original_method(model, "pool")(x, pool_type)  # sizes do not matter
        start = self.num_prefix
        mean = weighted_mean(x, size, start)
        largest = x[:, start:].masked_fill(size[:, start:] == 0, -torch.inf).amax(dim=1)  # padding never wins
        return {"avg": mean, "avgmax": 0.5 * (largest + mean), "max": largest}[pool_type]

    # FLOPs --------------------------------------------------------------------------------
    def flops(self, trace):
        report = super().flops(trace)
        rope_flops = self._rope_flops(trace.grid)
        if rope_flops:
            report.add("vision", "rope", rope_flops)
        return report

    def _rope_flops(self, grid: tuple[int, int] | None) -> int:
        """FLOPs of the model's own computation of the rotary table for ``grid``, once per forward: timm
        1.0.20's mixed RoPE builds it with matmuls, later versions element-wise (0). Measured once per
        grid with ``FlopCounterMode`` on the call ``Eva._pos_embed`` makes, since it depends on the timm
        version and not on the tokens."""
        rope, model = self.model.rope, self.model
        if rope is None or grid is None:
            return 0
        if grid not in self.rope_table_flops:
            from torch.utils.flop_counter import FlopCounterMode

            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                if model.dynamic_img_size:
                    rope.get_embed(shape=grid)
                elif hasattr(rope, "feat_shape"):
                    rope.get_embed()
                else:
                    rope.get_embed(shape=model.patch_embed.grid_size)
            self.rope_table_flops[grid] = counter.get_total_flops()
        return self.rope_table_flops[grid]

    def layer_costs(self, layer: int) -> LayerCosts:
        block = self.model.blocks[layer]
        attn = block.attn
        inner = attn.proj.in_features  # heads x head_dim (timm 1.0.20's EvaAttention has no head_dim)
        return LayerCosts(per_attention_token=linear_flops(attn, 1),
                          per_token_pair=attention_flops(1, attn.num_heads, 1, 1, inner // attn.num_heads),
                          per_mlp_token=linear_flops(block.mlp, 1))

    def _head_flops(self, trace) -> int:
        model, batch = self.model, trace.batch_size
        flops = 0
        pool = model.attn_pool
        if pool is not None:
            tokens, latents = trace.final_tokens, pool.latent_len
            flops += linear_flops(pool.q, batch * latents) + linear_flops(pool.kv, batch * tokens)
            flops += attention_flops(batch, pool.num_heads, latents, tokens, pool.head_dim)
            flops += linear_flops(pool.proj, batch * latents)
            if pool.mlp is not None:
                flops += linear_flops(pool.mlp, batch * latents)
        if self.head_mode == "logits":
            flops += linear_flops(model.head, batch)
        return flops
