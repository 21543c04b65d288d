"""tokred.calibrate: the soft (calibration) forward equals the hard one, thresholds train
towards the FLOPs budget, nothing else changes, bad input."""
import copy

import pytest
import torch

import tokred
from helpers import tiny_vit
from tokred.calibrate import Calibration, straight_through
from tokred.reference import load_reference_model, load_reference_train_data


def test_straight_through_is_hard_forward_and_sigmoid_backward():
    score = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)
    threshold = torch.tensor(0.5, requires_grad=True)
    mask = straight_through(score, threshold, 0.1)
    assert mask.tolist() == [0.0, 0.0, 1.0]
    mask.sum().backward()
    sigmoid = torch.sigmoid((score.detach() - 0.5) / 0.1)
    torch.testing.assert_close(score.grad, sigmoid * (1 - sigmoid) / 0.1)


def _soft(model, reducer, images):
    adapter = model.__dict__["_tokred_adapter"]
    calibration = Calibration(reducer, [adapter.layer_costs(layer) for layer in range(len(model.blocks))])
    adapter.stage.calibration = calibration
    try:
        return model(images), calibration
    finally:
        adapter.stage.calibration = None


@pytest.mark.parametrize("prop_attn", [True, False])
def test_soft_forward_equals_the_hard_rule(prop_attn):
    torch.manual_seed(2)
    images = torch.randn(1, 3, 32, 32)
    reducer = tokred.Thresholds(merge=[0.4, 0.3, 0.2, 0.2], prune=[0.6, 0.7, 0.8, 0.8], prop_attn=prop_attn)
    model = tokred.apply(tiny_vit(init_values=0.2), reducer)
    with torch.no_grad():
        hard = model(images)
        report, tokens = tokred.flops(model), tokred.last_trace(model).tokens()
        soft, calibration = _soft(model, reducer, images)
    torch.testing.assert_close(soft, hard, atol=1e-5, rtol=1e-4)
    blocks = sum(f for _, part, f in report.layers if part.startswith("block") and not part.endswith("reducer"))
    assert calibration.expected_flops.item() == pytest.approx(blocks, rel=1e-6)
    assert tokens[-1] < 65  # the thresholds did act


@pytest.fixture(scope="module")
def digits():
    images, labels = load_reference_train_data()
    return [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]


def test_calibrate_trains_only_the_thresholds(digits):
    model = load_reference_model()
    weights = copy.deepcopy(model.state_dict())
    ratio = tokred.calibrate(model, digits, target_flops=0.5, epochs=2, progress=False)
    (reducer,) = tokred.reducers_of(model)
    assert isinstance(reducer, tokred.Thresholds)
    assert ratio < 0.9  # moved from 1.0 towards the budget
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model(digits[0][0])
    assert tokred.last_trace(model).final_tokens < 65


def test_calibrate_bad_input(digits):
    model = tiny_vit()
    with pytest.raises(ValueError, match="empty data loader"):
        tokred.calibrate(model, [])
    assert type(model).__name__ == "VisionTransformer"
    with pytest.raises(ValueError, match="target_flops"):
        tokred.calibrate(model, digits, target_flops=0)
    tokred.apply(model, tokred.ToMe(r=2))
    with pytest.raises(ValueError, match="trains tokred.Thresholds"):
        tokred.calibrate(model, digits)
    assert tokred.reducers_of(model) == (tokred.ToMe(r=2),)


def test_thresholds_need_the_attention_signal(monkeypatch, images):
    from tokred.adapters.timm_vit import TimmViTAdapter

    monkeypatch.setattr(TimmViTAdapter, "provides_heads", False)
    model = tiny_vit()
    with pytest.raises(ValueError, match="per-head queries and keys"):
        tokred.apply(model, tokred.Thresholds(merge=0.5))
    assert tokred.reducers_of(model) == ()


@pytest.mark.parametrize("name", ["open_clip", "hf_siglip"])
def test_calibrate_on_other_adapters(name):
    from test_all_adapters import MODELS

    build, run, _ = MODELS[name]
    model = build()
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 32, (4,))) for _ in range(2)]
    ratio = tokred.calibrate(model, batches, target_flops=0.3, epochs=4, lr=0.3, progress=False, forward=run)
    assert 0 < ratio < 1  # features used as logits: enough to see the thresholds train
    (reducer,) = tokred.reducers_of(model)
    assert isinstance(reducer, tokred.Thresholds)
