"""timm VisionTransformer family: ViT, DeiT (also distilled), registers, LayerScale, q/k norm.

Hook point: every ``Block``, after attention and before the MLP. The merge metric is the keys
the block's attention already computes (averaged over heads), attention stays on
``F.scaled_dot_product_attention`` with proportional attention as an additive float mask, and
all prefix tokens (class, distillation, registers) are protected and stay in front.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokred.adapters.base import (Adapter, block_costs, inherits_method, original_class, original_method,
                                  patch_module, unpatch_module)
from tokred.engine import VisionStage, weight_bias, weighted_mean
from tokred.signals import Heads
from tokred.flops import FlopsReport, LayerCosts, add_block_flops, attention_flops, conv_flops, linear_flops
from tokred.reducers.base import Reducer
from tokred.trace import Trace

POOLS = ("", "token", "avg", "avgmax", "max", "map")


def attention_with_heads(attn: nn.Module, x: Tensor, bias: Tensor | None, need_heads: bool) -> tuple[Tensor, Heads | None]:
    """timm ``Attention.forward`` with an additive bias, also returning its queries and keys."""
    batch, num_tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return attention_core(attn, q, k, v, bias, gate), (Heads(q, k, attn.scale, bias) if need_heads else None)


def attention_core(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                   gate: Tensor | None) -> Tensor:
    """What timm's attention modules do once they have q, k, v (B, H, N, D): fused SDPA with the
    additive ``bias`` (or the written-out softmax when the module has fused attention off), the
    heads merged, the module's norm and gate, the output projection."""
    batch, _, num_tokens, _ = q.shape
    if attn.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        x = attn.attn_drop(scores.softmax(dim=-1)) @ v
    x = attn.norm(x.transpose(1, 2).reshape(batch, num_tokens, x.shape[1] * x.shape[3]))  # explicit: batch may be 0
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def _mask_kwargs(attn_mask: Tensor | None, is_causal: bool) -> dict:
    """``Block.forward``'s mask arguments; ``is_causal`` only when set (timm < 1.0.26 has no such argument)."""
    return {"attn_mask": attn_mask, "is_causal": True} if is_causal else {"attn_mask": attn_mask}


class _BlockMixin:
    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        adapter = self._tokred_adapter
        if adapter.stage.run is None:  # called outside VisionTransformer.forward_features
            return super().forward(x, **_mask_kwargs(attn_mask, is_causal))
        return adapter.block_forward(self, x, attn_mask, is_causal)


class _ViTMixin:
    def forward_features(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapter = self._tokred_adapter
        with adapter.running(x) as run:
            out = super().forward_features(x, *args, **kwargs)
        adapter.remember_sizes(out, run.size)
        return out

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        self._tokred_adapter.head_mode = "pre_logits" if pre_logits else "logits"
        return super().forward_head(x, pre_logits=pre_logits)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        size = self._tokred_adapter.sizes_of(x)
        if size is None:
            return super().pool(x, pool_type)
        return self._tokred_adapter.weighted_pool(x, pool_type, size)


class TimmViTAdapter(Adapter):
    family = ("timm VisionTransformer (ViT, DeiT, distilled DeiT, register, LayerScale and q/k-norm "
              "variants built from timm Block and Attention)")
    stages = ("vision",)
    provides_heads = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        super().__init__(model, reducers)
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        for i, block in enumerate(model.blocks):
            if not issubclass(original_class(block), Block) or not inherits_method(block, Block, "forward"):
                raise TypeError(f"block {i} of {type(model).__name__} is a {original_class(block).__name__}; "
                                "tokred's timm adapter supports blocks of timm's Block class (pre-norm ViT blocks)")
            if not inherits_method(block.attn, Attention, "forward"):
                raise TypeError(f"block {i} uses {type(block.attn).__name__}; tokred's timm adapter supports "
                                "timm's Attention module")
        if model.global_pool not in POOLS:
            raise ValueError(f"global_pool='{model.global_pool}' is not supported; supported: {POOLS}")
        if model.attn_pool is not None and getattr(model.attn_pool, "pos_embed", None) is not None and reducers:
            raise ValueError("the attention-pool head has its own fixed-length position embedding, "
                             "so tokens cannot be reduced before it")
        self.num_prefix = model.num_prefix_tokens
        self.stage = VisionStage(reducers.get("vision"), len(model.blocks), self.num_prefix)
        self.head_mode: str | None = None
        #: id(features) -> (weak reference to the features forward_features returned, their sizes or None)
        self.feature_sizes: dict[int, tuple[weakref.ref, Tensor | None]] = {}

    # patching -----------------------------------------------------------------------------
    def patch(self) -> None:
        patch_module(self.model, _ViTMixin, self)
        for i, block in enumerate(self.model.blocks):
            patch_module(block, _BlockMixin, self, layer=i)

    def unpatch(self) -> None:
        for block in self.model.blocks:
            unpatch_module(block)
        unpatch_module(self.model)

    # forward ------------------------------------------------------------------------------
    def running(self, images: Tensor):
        """The bookkeeping of one ``forward_features`` on ``images`` (:meth:`VisionStage.running`)."""
        grid = None
        if images.dim() == 4 and hasattr(self.model.patch_embed, "dynamic_feat_size"):
            grid = tuple(self.model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
        self.head_mode = None
        return self.stage.running(images.shape[0], grid, on_end=self.set_trace)

    def remember_sizes(self, features: Tensor, size: Tensor | None) -> None:
        """Keep ``size`` (B, N, 1) for as long as ``features`` lives, so that ``forward_head`` pools
        them with their own sizes even after later forwards."""
        table, key = self.feature_sizes, id(features)

        def forget(ref: weakref.ref) -> None:
            if table.get(key, (None,))[0] is ref:
                del table[key]

        table[key] = (weakref.ref(features, forget), size)

    def sizes_of(self, features: Tensor) -> Tensor | None:
        """Sizes of the tokens of ``features`` (None: each stands for one patch) for pooling.

        Raises ``ValueError`` for a tensor that ``forward_features`` did not return (a copy, a
        computed tensor) when it has as many tokens as the last forward's merged ones: their
        sizes cannot be known, and pooling them as if each were one patch would be wrong.
        """
        entry = self.feature_sizes.get(id(features))
        if entry is not None and entry[0]() is features:
            return entry[1]
        run = self.stage.last_run
        if run is not None and run.size is not None and features.dim() == 3 and features.shape[1] == run.size.shape[1]:
            raise ValueError(f"forward_head got {features.shape[1]} tokens that are not the tensor forward_features "
                             "returned (a copy or a computed tensor?) while the last forward merged tokens, so their "
                             "sizes are unknown; pass forward_head the tensor forward_features returned")
        return None

    def block_forward(self, block: nn.Module, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        if (attn_mask is not None or is_causal) and self.stage.reducer is not None:
            raise ValueError("tokred cannot reduce tokens when an attention mask or causal attention is "
                             "passed to the ViT blocks")

        def attend(x, bias, need_heads):
            y, heads = attention_with_heads(block.attn, block.norm1(x), bias, need_heads)
            return block.drop_path1(block.ls1(y)), heads

        return self.stage.block(
            block._tokred_layer, x, attend,
            feed_forward=lambda x: block.drop_path2(block.ls2(block.mlp(block.norm2(x)))),
            original=lambda x: original_method(block)(x, **_mask_kwargs(attn_mask, is_causal)))

    def weighted_pool(self, x: Tensor, pool_type: str | None, size: Tensor) -> Tensor:
        """The model's pooling with every token weighted by its ``size`` (B, N, 1), the number of
        patches it stands for; under a reducer that ``pools_plain_mean`` (ToMe, PiToMe: no padding),
        average pooling is timm's plain mean over the tokens left, as their references pool."""
        model = self.model
        start = 0 if model.pool_include_prefix else self.num_prefix
        if model.attn_pool is not None:
            return model.attn_pool(x[:, start:], attn_mask=weight_bias(size[:, start:, 0]))
        pool_type = model.global_pool if pool_type is None else pool_type
        if pool_type in ("token", ""):
            return original_method(model, "pool")(x, pool_type)  # sizes do not matter
        plain = self.stage.reducer is not None and self.stage.reducer.pools_plain_mean
        mean = weighted_mean(x, None if plain else size, start)
        largest = x[:, start:].masked_fill(size[:, start:] == 0, -torch.inf).amax(dim=1)  # padding never wins
        return {"avg": mean, "avgmax": 0.5 * (largest + mean), "max": largest}[pool_type]

    # FLOPs --------------------------------------------------------------------------------
    def flops(self, trace: Trace) -> FlopsReport:
        model, batch = self.model, trace.batch_size
        report = FlopsReport()
        proj = getattr(model.patch_embed, "proj", None)
        if isinstance(proj, nn.Conv2d) and trace.grid is not None:
            report.add("vision", "patch_embed", conv_flops(proj, batch, trace.grid))
        add_block_flops(report, trace, self.layer_costs)
        if self.head_mode is not None:
            report.add("vision", "head", self._head_flops(trace))
        return report

    def layer_costs(self, layer: int) -> LayerCosts:
        block = self.model.blocks[layer]
        return block_costs(block.attn, block.mlp)

    def _head_flops(self, trace: Trace) -> int:
        model, batch = self.model, trace.batch_size
        flops = 0
        pool = model.attn_pool
        if pool is not None and not hasattr(model, "head_dist"):
            tokens = trace.final_tokens - (0 if model.pool_include_prefix else self.num_prefix)
            latents = pool.latent_len
            flops += linear_flops(pool.q, batch * latents) + linear_flops(pool.kv, batch * tokens)
            flops += attention_flops(batch, pool.num_heads, latents, tokens, pool.head_dim)
            flops += linear_flops(pool.proj, batch * latents)
            if pool.mlp is not None:
                flops += linear_flops(pool.mlp, batch * latents)
        if self.head_mode == "logits":
            flops += linear_flops(model.head, batch)
            if getattr(model, "head_dist", None) is not None:
                flops += linear_flops(model.head_dist, batch)
        return flops
