"""open_clip image towers: ``CLIP`` / ``CustomTextCLIP`` models whose ``visual`` is open_clip's
``VisionTransformer``, or that ``VisionTransformer`` on its own.

Hook points: the image tower's ``forward`` brackets one token run (:class:`VisionStage`) and every
residual block of ``visual.transformer`` runs through the stage. Both block kinds of open_clip
are supported:

* ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (the default): q, k and v come from
  the packed ``in_proj_weight``/``in_proj_bias``, attention is ``F.scaled_dot_product_attention``
  with proportional attention as an additive float mask, then ``out_proj``;
* ``CustomResidualAttentionBlock`` with open_clip's own ``Attention`` (chosen by
  ``block_type='custom'`` or any of ``qk_norm``, ``scaled_cosine_attn``, ``scale_heads``,
  ``scale_attn_inner``, ``scale_attn``, ``scale_fc``): q/k LayerNorm, scaled cosine attention
  (on SDPA with the per-head logit scale folded into the queries), per-head scale, inner and
  post-attention LayerNorm, MLP LayerNorm.

LayerScale (``ls_1``/``ls_2``) and a sequence-first transformer (``batch_first=False``) are
handled. Whenever a block changes nothing, open_clip's own block forward runs, so r=0 / keep=1.0
is bit-identical to the unpatched model. The merge metric is the attention keys averaged over
heads. The class token is a protected prefix token. Pooling: class token (``pool_type='tok'``)
needs nothing; ``pool_type='avg'`` becomes a size-weighted mean of the patch tokens; open_clip's
``AttentionalPooler`` (``attentional_pool=True``, ``'parallel'`` or ``'cascade'``) gets log(size)
as an additive attention mask on its keys. ``pool_type='none'`` returns the reduced tokens.

The text tower is never touched, and neither is ``visual.forward_intermediates`` (it runs
unreduced). With patch dropout active (training) the trace has no grid, so grid reducers (Pool)
refuse; reducing with gradient checkpointing on is refused (recomputation would not see the
reduction). open_clip 3.3.0's own scaled-cosine and non-SDPA attention paths fail (``torch.bmm`` on
4-D tensors); the blocks tokred runs itself work there, unchanged blocks fail as upstream does.
open_clip is imported lazily (it is an optional dependency).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokred.adapters.base import (Adapter, block_costs, inherits_method, multihead_attention_flops, original_class,
                                  original_method, patch_module, unpatch_module)
from tokred.engine import TokenRun, VisionStage, weight_bias
from tokred.signals import Heads
from tokred.flops import FlopsReport, LayerCosts, add_block_flops, conv_flops
from tokred.reducers.base import Reducer
from tokred.trace import Trace


# attention with an additive bias, returning its per-head queries and keys -------------------
def mha_attention(attn: nn.MultiheadAttention, x: Tensor, bias: Tensor | None,
                  need_heads: bool) -> tuple[Tensor, Heads | None]:
    """``nn.MultiheadAttention`` self-attention of batch-first ``x`` (B, N, C) on SDPA with an
    additive ``bias``; also its per-head queries and keys if ``need_heads``."""
    batch, num_tokens, width = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, num_tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
    if bias is not None:
        bias = bias.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.dropout if attn.training else 0.0)
    y = attn.out_proj(y.transpose(1, 2).reshape(batch, num_tokens, width))
    return y, (Heads(q, k, q.shape[-1] ** -0.5, bias) if need_heads else None)


def custom_attention(attn: nn.Module, x: Tensor, bias: Tensor | None,
                     need_heads: bool) -> tuple[Tensor, Heads | None]:
    """open_clip's ``Attention.forward`` of ``x`` (B, N, C) with an additive ``bias``; also its
    per-head queries and keys (after q/k norm, or unit-normalised for scaled cosine attention)."""
    batch, num_tokens, width = x.shape
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, num_tokens, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    if bias is not None:
        bias = bias.to(q.dtype)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if attn.logit_scale is not None:  # scaled cosine attention: unit q and k, per-head learnt temperature
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        logit_scale = torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp()
        q, scale = q * logit_scale, 1.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    else:
        scale = attn.scale
        q, k = attn.ln_q(q), attn.ln_k(k)
        if attn.use_fsdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            scores = (q * attn.scale) @ k.transpose(-1, -2)
            if bias is not None:
                scores = scores + bias
            y = attn.attn_drop(scores.softmax(dim=-1)) @ v
    if attn.head_scale is not None:
        y = y * attn.head_scale
    y = attn.ln_inner(y.transpose(1, 2).reshape(batch, num_tokens, width))
    y = attn.out_drop(attn.out_proj(y))
    return y, (Heads(q, k, scale, bias) if need_heads else None)


def attentional_pool(pool: nn.Module, x: Tensor, size: Tensor) -> Tensor:
    """open_clip's ``AttentionalPooler.forward`` with log(``size``) (B, N) added to the attention
    logits of every query and head, so that a token of size s weighs like s copies of itself."""
    batch = x.shape[0]
    x = pool.ln_k(x)
    q = pool.ln_q(pool.query)
    queries = q.unsqueeze(0).expand(batch, -1, -1)
    mask = weight_bias(size, pool.attn.num_heads, q.shape[0], q.dtype)
    return pool.attn(queries, x, x, need_weights=False, attn_mask=mask)[0]


# patched classes ----------------------------------------------------------------------------
class _VisualMixin:
    def forward(self, x: Tensor):
        with self._tokred_adapter.running(x):
            return super().forward(x)

    def _pool(self, x: Tensor):
        run = self._tokred_adapter.stage.run
        if run is None or run.size is None or x.shape[1] != run.size.shape[1]:
            return super()._pool(x)
        return self._tokred_adapter.weighted_pool(x, run)


class _ResidualBlockMixin:
    """``ResidualAttentionBlock`` (``nn.MultiheadAttention``)."""

    def forward(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                attn_mask: Tensor | None = None):
        adapter = self._tokred_adapter
        if adapter.stage.run is None:  # not called from the patched image tower's forward
            return super().forward(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)
        if k_x is not None or v_x is not None:
            raise ValueError("tokred's open_clip adapter runs the image tower's blocks as self-attention; "
                             "separate key/value inputs are not supported")
        return adapter.block_forward(self, q_x, attn_mask)


class _CustomBlockMixin:
    """``CustomResidualAttentionBlock`` (open_clip ``Attention``)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None):
        adapter = self._tokred_adapter
        if adapter.stage.run is None:
            return super().forward(x, attn_mask=attn_mask)
        return adapter.block_forward(self, x, attn_mask)


class OpenClipViTAdapter(Adapter):
    family = ("open_clip CLIP / CustomTextCLIP image towers (open_clip VisionTransformer with "
              "nn.MultiheadAttention or custom Attention blocks; class-token, average or attentional pooling)")
    stages = ("vision",)
    provides_heads = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if "open_clip" not in sys.modules:  # an open_clip model implies open_clip was imported
            return False
        try:
            from open_clip.model import CLIP, CustomTextCLIP
            from open_clip.transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(model, (CLIP, CustomTextCLIP, VisionTransformer))

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        super().__init__(model, reducers)
        from open_clip.transformer import VisionTransformer

        visual = model if isinstance(model, VisionTransformer) else getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            hint = (" (its timm trunk `model.visual.trunk` can be reduced with tokred's timm adapter)"
                    if type(visual).__name__ == "TimmModel" else "")
            raise TypeError(f"the image tower of this {type(model).__name__} is a {type(visual).__name__}{hint}; "
                            "tokred's open_clip adapter supports open_clip VisionTransformer image towers")
        for name in ("forward", "_embeds", "_pool", "_global_pool"):
            if not inherits_method(visual, VisionTransformer, name):
                raise TypeError(f"{original_class(visual).__name__} overrides VisionTransformer.{name}; tokred's "
                                "open_clip adapter supports open_clip's own VisionTransformer")
        self.visual = visual
        self.block_kinds = self._check_blocks(visual)
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        reducer = reducers.get("vision")
        if visual.attn_pool is not None and reducer is not None:
            for pool in (visual.attn_pool, visual.attn_pool_contrastive):
                self._check_attentional_pool(pool)
        self.num_prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
        self.stage = VisionStage(reducer, len(visual.transformer.resblocks), self.num_prefix)

    @staticmethod
    def _check_blocks(visual: nn.Module) -> list[str]:
        from open_clip.transformer import (Attention, CustomResidualAttentionBlock, CustomTransformer,
                                           ResidualAttentionBlock, Transformer)

        transformer = visual.transformer
        if not (inherits_method(transformer, Transformer, "forward") or
                inherits_method(transformer, CustomTransformer, "forward")):
            raise TypeError(f"the image tower's transformer is a {original_class(transformer).__name__}; tokred's "
                            "open_clip adapter supports open_clip's Transformer and CustomTransformer")
        batch_first = getattr(transformer, "batch_first", True)
        kinds = []
        for i, block in enumerate(transformer.resblocks):
            block_class = original_class(block)
            if issubclass(block_class, ResidualAttentionBlock) and all(
                    inherits_method(block, ResidualAttentionBlock, name) for name in ("forward", "attention")):
                attn = block.attn
                if type(attn) is not nn.MultiheadAttention:
                    raise TypeError(f"block {i} uses {type(attn).__name__}; tokred's open_clip adapter supports "
                                    "nn.MultiheadAttention in ResidualAttentionBlock")
                if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
                    raise TypeError(f"block {i}: nn.MultiheadAttention with separate q/k/v weights, bias_k/bias_v "
                                    "or add_zero_attn is not supported")
                if attn.batch_first != batch_first:
                    raise TypeError(f"block {i}: its attention has batch_first={attn.batch_first} but the "
                                    f"transformer runs with batch_first={batch_first}")
                if hasattr(block, "ln_1_kv"):
                    raise TypeError(f"block {i} is a cross-attention block; the image tower needs self-attention")
                kinds.append("mha")
            elif issubclass(block_class, CustomResidualAttentionBlock) and inherits_method(
                    block, CustomResidualAttentionBlock, "forward"):
                if not inherits_method(block.attn, Attention, "forward"):
                    raise TypeError(f"block {i} uses {type(block.attn).__name__}; tokred's open_clip adapter "
                                    "supports open_clip's Attention in CustomResidualAttentionBlock")
                if not batch_first:
                    raise TypeError(f"block {i}: CustomResidualAttentionBlock needs batch_first=True")
                kinds.append("custom")
            else:
                raise TypeError(f"block {i} of the image tower is a {block_class.__name__}; tokred's open_clip "
                                "adapter supports ResidualAttentionBlock and CustomResidualAttentionBlock")
        return kinds

    @staticmethod
    def _check_attentional_pool(pool: nn.Module | None) -> None:
        from open_clip.transformer import AttentionalPooler

        if pool is None:
            return
        if not inherits_method(pool, AttentionalPooler, "forward") or type(pool.attn) is not nn.MultiheadAttention:
            raise ValueError(f"the image tower pools with {original_class(pool).__name__}, which tokred cannot give "
                             "the token sizes (log-size attention mask) that merged tokens need; only open_clip's "
                             "AttentionalPooler is supported with a reducer")

    # patching -----------------------------------------------------------------------------
    def patch(self) -> None:
        visual = self.visual
        previous = visual.__dict__.get("_tokred_adapter")
        if previous is not None:  # the tower was patched on its own, and now its CLIP is (or the reverse)
            previous.unpatch()
        patch_module(visual, _VisualMixin, self)
        self.model._tokred_adapter = self
        for i, (block, kind) in enumerate(zip(visual.transformer.resblocks, self.block_kinds)):
            patch_module(block, _ResidualBlockMixin if kind == "mha" else _CustomBlockMixin, self, layer=i)

    def unpatch(self) -> None:
        for block in self.visual.transformer.resblocks:
            unpatch_module(block)
        unpatch_module(self.visual)
        self.model.__dict__.pop("_tokred_adapter", None)

    # forward ------------------------------------------------------------------------------
    def running(self, images: Tensor):
        """The bookkeeping of one image-tower forward on ``images`` (:meth:`VisionStage.running`)."""
        visual = self.visual
        if (self.stage.reducer is not None and getattr(visual.transformer, "grad_checkpointing", False)
                and torch.is_grad_enabled()):
            raise ValueError("tokred cannot reduce tokens in an image tower with gradient checkpointing on "
                             "(the recomputed blocks would not see the reduction); call "
                             "model.set_grad_checkpointing(False) or run without gradients")
        grid = self._grid(images)
        dropout = visual.patch_dropout
        if dropout.training and getattr(dropout, "prob", 0.0) > 0:  # patches were dropped: no full grid
            grid = None
        return self.stage.running(images.shape[0], grid, on_end=self.set_trace)

    def _grid(self, images: Tensor) -> tuple[int, int] | None:
        if images.dim() != 4:
            return None
        conv = self.visual.conv1
        return tuple((size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1 for size, pad, dil, kernel, stride in
                     zip(images.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))

    def block_forward(self, block: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        if attn_mask is not None and self.stage.reducer is not None:
            raise ValueError("tokred cannot reduce tokens when an attention mask is passed to the image tower's blocks")
        layer, batch_first = block._tokred_layer, self.batch_first
        block_forward = original_method(block)

        def original(x: Tensor) -> Tensor:
            out = block_forward(x if batch_first else x.transpose(0, 1), attn_mask=attn_mask)
            return out if batch_first else out.transpose(0, 1)

        if self.block_kinds[layer] == "mha":
            def attend(x, bias, need_heads):
                y, heads = mha_attention(block.attn, block.ln_1(x), bias, need_heads)
                return block.ls_1(y), heads
        else:
            def attend(x, bias, need_heads):
                y, heads = custom_attention(block.attn, block.ln_1(x), bias, need_heads)
                return block.ls_1(block.ln_attn(y)), heads

        out = self.stage.block(layer, x if batch_first else x.transpose(0, 1), attend,
                               feed_forward=lambda x: block.ls_2(block.mlp(block.ln_2(x))), original=original)
        return out if batch_first else out.transpose(0, 1)

    def weighted_pool(self, x: Tensor, run: TokenRun) -> tuple[Tensor, Tensor]:
        """open_clip's ``VisionTransformer._pool`` with every token weighted by its size."""
        visual = self.visual
        if visual.attn_pool is not None:
            size = run.size[..., 0]
            if visual.attn_pool_contrastive is not None:
                x = visual.ln_post(x)
                tokens = attentional_pool(visual.attn_pool, x, size)
                if visual.attn_pool_type == "parallel":
                    pooled = attentional_pool(visual.attn_pool_contrastive, x, size)
                else:  # cascade: the contrastive pooler sees the first pooler's queries
                    pooled = visual.attn_pool_contrastive(tokens)
                return pooled, tokens
            x = visual.ln_post(attentional_pool(visual.attn_pool, x, size))
            return original_method(visual, "_global_pool")(x)  # pools the pooler's queries: sizes do not matter
        if visual.pool_type != "avg":
            return original_method(visual, "_pool")(x)  # class token or all tokens: sizes do not matter
        start = 1  # open_clip's average pool always leaves out the class token
        if visual.final_ln_after_pool:
            return visual.ln_post(run.weighted_mean(x, start)), x[:, start:]
        x = visual.ln_post(x)
        return run.weighted_mean(x, start), x[:, start:]

    # FLOPs --------------------------------------------------------------------------------
    def flops(self, trace: Trace) -> FlopsReport:
        visual, batch = self.visual, trace.batch_size
        report = FlopsReport()
        grid = trace.grid if trace.grid is not None else tuple(visual.grid_size)
        report.add("vision", "patch_embed", conv_flops(visual.conv1, batch, grid))
        add_block_flops(report, trace, self.layer_costs)
        report.add("vision", "head", self._head_flops(batch, trace.final_tokens))
        return report

    def layer_costs(self, layer: int) -> LayerCosts:
        block = self.visual.transformer.resblocks[layer]
        return block_costs(block.attn, block.mlp, extra_per_token=2 * block.attn.in_proj_weight.numel())

    def _head_flops(self, batch: int, tokens: int) -> int:
        """Attentional pooling and the ``proj`` matmul of the image tower."""
        visual = self.visual
        flops, rows = 0, batch  # rows: pooled vectors multiplied by proj
        if visual.attn_pool is not None:
            queries = visual.attn_pool.query.shape[0]
            flops += multihead_attention_flops(visual.attn_pool.attn, batch, queries, tokens)
            contrastive = visual.attn_pool_contrastive
            if contrastive is not None:
                keys = tokens if visual.attn_pool_type == "parallel" else queries
                flops += multihead_attention_flops(contrastive.attn, batch, contrastive.query.shape[0], keys)
                rows = batch * contrastive.query.shape[0]
            elif visual.pool_type == "none":
                rows = batch * queries
        elif visual.pool_type == "none":
            rows = batch * tokens
        if visual.proj is not None:
            flops += 2 * rows * visual.proj.shape[0] * visual.proj.shape[1]
        return flops
