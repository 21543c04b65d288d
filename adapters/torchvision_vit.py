"""torchvision ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``,
``vit_h_14``, and the class built directly, with or without a convolutional stem).

Hook points: ``VisionTransformer.forward`` brackets one token run (:class:`VisionStage`) and every
``EncoderBlock`` of ``encoder.layers`` runs through the stage, after attention and before the MLP.
The block's ``nn.MultiheadAttention`` (``self_attention``, batch-first, packed in-projection) runs
as open_clip's does in tokred (:func:`tokred.adapters.open_clip_vit.mha_attention`): q, k and v
from ``in_proj_weight``, ``F.scaled_dot_product_attention`` with proportional attention as an
additive float mask, then ``out_proj``; the merge metric is the keys averaged over heads. The
class token is a protected prefix token and the model classifies from it, so token sizes never
reach the head. Whenever a block changes nothing, torchvision's own block forward runs, so every
identity setting is bit-identical to the unpatched model.
"""
from __future__ import annotations

from torch import Tensor, nn

from tokred.adapters.base import (Adapter, block_costs, inherits_method, original_class, original_method,
                                  patch_module, unpatch_module)
from tokred.adapters.open_clip_vit import mha_attention
from tokred.adapters.refused import refuse
from tokred.engine import VisionStage
from tokred.flops import FlopsReport, LayerCosts, add_block_flops, conv_flops, linear_flops
from tokred.reducers.base import Reducer
from tokred.trace import Trace


class _ViTMixin:
    def forward(self, x: Tensor) -> Tensor:
        with self._tokred_adapter.running(x):
            return super().forward(x)


class _EncoderBlockMixin:
    def forward(self, input: Tensor) -> Tensor:
        adapter = self._tokred_adapter
        if adapter.stage.run is None:  # not called from the patched VisionTransformer.forward
            return super().forward(input)
        return adapter.block_forward(self, input)


def _conv_out(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    return tuple((s + 2 * pad - dil * (kernel - 1) - 1) // stride + 1 for s, pad, dil, kernel, stride in
                 zip(size, conv.padding, conv.dilation, conv.kernel_size, conv.stride))


class TorchvisionViTAdapter(Adapter):
    family = "torchvision VisionTransformer (vit_b_16 and the other vit_* models; class-token head)"
    stages = ("vision",)
    provides_heads = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        refuse(model)  # torchvision's Swin: a TypeError saying why
        try:
            from torchvision.models.vision_transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(model, VisionTransformer)

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        super().__init__(model, reducers)
        from torchvision.models.vision_transformer import Encoder, EncoderBlock, VisionTransformer

        for owner, module, names in ((VisionTransformer, model, ("forward", "_process_input")),
                                     (Encoder, model.encoder, ("forward",))):
            for name in names:
                if not inherits_method(module, owner, name):
                    raise TypeError(f"{original_class(module).__name__} overrides {owner.__name__}.{name}; tokred's "
                                    "torchvision adapter supports torchvision's own VisionTransformer")
        self.blocks = list(model.encoder.layers)
        for i, block in enumerate(self.blocks):
            kind = original_class(block)
            if not issubclass(kind, EncoderBlock) or not inherits_method(block, EncoderBlock, "forward"):
                raise TypeError(f"block {i} is a {kind.__name__}; tokred's torchvision adapter "
                                "supports torchvision's EncoderBlock")
            attn = block.self_attention
            if type(attn) is not nn.MultiheadAttention or not attn.batch_first:
                raise TypeError(f"block {i} uses {type(attn).__name__}; tokred's torchvision adapter supports a "
                                "batch-first nn.MultiheadAttention")
            if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
                raise TypeError(f"block {i}: nn.MultiheadAttention with separate q/k/v weights, bias_k/bias_v or "
                                "add_zero_attn is not supported")
        self.num_prefix = 1
        self.stage = VisionStage(reducers.get("vision"), len(self.blocks), self.num_prefix)

    # patching -----------------------------------------------------------------------------
    def patch(self) -> None:
        patch_module(self.model, _ViTMixin, self)
        for i, block in enumerate(self.blocks):
            patch_module(block, _EncoderBlockMixin, self, layer=i)

    def unpatch(self) -> None:
        for block in self.blocks:
            unpatch_module(block)
        unpatch_module(self.model)

    # forward ------------------------------------------------------------------------------
    def running(self, images: Tensor):
        """The bookkeeping of one forward on ``images`` (:meth:`VisionStage.running`)."""
        grid = None
        if images.dim() == 4:
            grid = (images.shape[-2] // self.model.patch_size, images.shape[-1] // self.model.patch_size)
        return self.stage.running(images.shape[0], grid, on_end=self.set_trace)

    def block_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        def attend(x, bias, need_heads):
            y, heads = mha_attention(block.self_attention, block.ln_1(x), bias, need_heads)
            return block.dropout(y), heads

        return self.stage.block(block._tokred_layer, x, attend,
                                feed_forward=lambda x: block.mlp(block.ln_2(x)), original=original_method(block))

    # FLOPs --------------------------------------------------------------------------------
    def flops(self, trace: Trace) -> FlopsReport:
        model, batch = self.model, trace.batch_size
        report = FlopsReport()
        if trace.grid is not None:
            size, flops = (model.image_size, model.image_size), 0
            stem = [model.conv_proj] if isinstance(model.conv_proj, nn.Conv2d) else list(model.conv_proj.modules())
            for conv in stem:
                if isinstance(conv, nn.Conv2d):
                    size = _conv_out(size, conv)
                    flops += conv_flops(conv, batch, size)
            report.add("vision", "patch_embed", flops)
        add_block_flops(report, trace, self.layer_costs)
        report.add("vision", "head", linear_flops(model.heads, batch))
        return report

    def layer_costs(self, layer: int) -> LayerCosts:
        block = self.blocks[layer]
        attn = block.self_attention
        return block_costs(attn, block.mlp, extra_per_token=2 * attn.in_proj_weight.numel())
