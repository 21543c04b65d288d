"""Analytic FLOPs from the trace against torch's FlopCounterMode on the same forward."""
import pytest
from timm.models.deit import VisionTransformerDistilled
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokred
from helpers import tiny_vit


def counted(fn):
    """FLOPs FlopCounterMode sees. SDPA runs on its math backend, whose matmuls the counter
    sees (it has no formula for the fused CPU kernel); the FLOPs are the same."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


MODELS = {
    "vit": lambda: tiny_vit(),
    "registers_qk_norm": lambda: tiny_vit(reg_tokens=2, qk_norm=True, init_values=0.1),
    "avg_pool": lambda: tiny_vit(class_token=False, global_pool="avg", mlp_ratio=3.0),
    "map_pool": lambda: tiny_vit(global_pool="map"),
    "swiglu": lambda: tiny_vit(mlp_layer=__import__("timm").layers.SwiGLUPacked, mlp_ratio=2.5),
    "distilled": lambda: VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4,
                                                    num_heads=3, num_classes=7).eval(),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("reducers", [(), (tokred.ToMe(r=0),), (tokred.ToMe(r=7),), (tokred.ToMe(r=(9, 0.5)),),
                                      (tokred.PiToMe(keep=0.8),), (tokred.Random(keep=0.3, layer=1),),
                                      (tokred.Pool(stride=(2, 3)),), (tokred.DToMe(thresholds=0.3),)])
def test_flops_match_the_flop_counter(name, reducers, images):
    model = tokred.apply(MODELS[name](), *reducers)
    assert counted(lambda: model(images)) == tokred.flops(model).total


def test_features_only_and_pre_logits(images):
    model = tokred.apply(tiny_vit(), tokred.ToMe(r=5))
    assert counted(lambda: model.forward_features(images)) == tokred.flops(model).total
    features = model.forward_features(images)
    both = counted(lambda: model.forward_head(model.forward_features(images), pre_logits=True))
    assert both == tokred.flops(model).total
    assert counted(lambda: model.forward_head(features)) > 0


def test_flops_of_an_unpatched_model_leave_it_unpatched(images):
    model = tiny_vit()
    report = tokred.flops(model, images)
    assert report.total == counted(lambda: model(images))
    assert type(model).__name__ == "VisionTransformer"
    assert set(report.stages) == {"vision"} and len(report.layers) == 1 + 4 + 1


def test_reduction_lowers_flops(images):
    model = tiny_vit()
    full = tokred.flops(model, images).total
    tokred.apply(model, tokred.ToMe(r=8))
    assert tokred.flops(model, images).total < full
