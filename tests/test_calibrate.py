"""tokred.calibrate: the soft (calibration) forward equals the hard one, image by image, in outputs
and FLOPs; the budget is reached within the tolerance; the data are streamed; nothing else changes;
bad input."""
import copy
import gc
import re
import weakref

import pytest
import torch

import tokred
from helpers import tiny_vit
from tokred.calibrate import Calibration, scaled_thresholds, straight_through
from tokred.reference import load_reference_model, load_reference_train_data


def test_straight_through_is_hard_forward_and_sigmoid_backward():
    score = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)
    threshold = torch.tensor(0.5, requires_grad=True)
    mask = straight_through(score, threshold, 0.1)
    assert mask.tolist() == [0.0, 0.0, 1.0]
    mask.sum().backward()
    sigmoid = torch.sigmoid((score.detach() - 0.5) / 0.1)
    torch.testing.assert_close(score.grad, sigmoid * (1 - sigmoid) / 0.1)


def _soft(model, reducer, images, run=lambda model, images: model(images)):
    adapter = model.__dict__["_tokred_adapter"]
    calibration = Calibration(reducer, adapter)
    adapter.vision_stage.calibration = calibration
    try:
        return run(model, images), calibration
    finally:
        adapter.vision_stage.calibration = None


def _alone_flops(model, images, run=lambda model, images: model(images)) -> list[int]:
    """Brute force: tokred.flops of every image run alone through the (hard) patched model."""
    flops = []
    with torch.no_grad():
        for image in images.split(1):
            run(model, image)
            flops.append(tokred.flops(model).total)
    return flops


def test_scaled_thresholds():
    merge = torch.tensor([0.5, 1.5, -3.0], dtype=torch.float64)
    prune = torch.tensor([0.4, -1.0, 2.0], dtype=torch.float64)
    same = scaled_thresholds(merge, prune, 0.0)
    assert same[0].tolist() == [0.5, 1.0, -1.0] and same[1].tolist() == [0.4, 0.0, 2.0]  # clipped only
    up, down = scaled_thresholds(merge, prune, 0.5), scaled_thresholds(merge, prune, -0.5)
    assert up[0].tolist() == [0.75, 1.0, 0.0] and up[1].tolist() == pytest.approx([0.2, 0.0, 1.0])
    assert down[0].tolist() == [-0.25, 0.0, -1.0] and down[1].tolist() == pytest.approx([0.6, 0.0, 3.0])
    never, most = scaled_thresholds(merge, prune, 1.0), scaled_thresholds(merge, prune, -1.0)
    assert never[0].tolist() == [1.0] * 3 and never[1].tolist() == [0.0] * 3
    assert most[0].tolist() == [-1.0] * 3
    scales = torch.linspace(-1, 1, 21).tolist()
    merges = torch.stack([scaled_thresholds(merge, prune, s)[0] for s in scales])
    prunes = torch.stack([scaled_thresholds(merge, prune, s)[1] for s in scales])
    assert (merges.diff(dim=0) >= 0).all() and (prunes.diff(dim=0) <= 0).all()  # less removal as the scale grows


@pytest.mark.parametrize("name", ["timm", "open_clip", "timm_eva02", "torchvision", "hf_clip", "hf_siglip"])
def test_calibration_flops_are_each_image_run_alone(name):
    """The FLOPs the calibration forward counts for a batch equal tokred.flops of each image alone
    under the hard rule (so a padded batch's cost does not leak in), and the full model's likewise."""
    from test_all_adapters import MODELS

    build, run, _ = MODELS[name]
    torch.manual_seed(3)
    images = torch.randn(5, 3, 32, 32)
    reducer = tokred.Thresholds(merge=0.3, prune=0.8)
    model = tokred.apply(build(), reducer)
    alone = _alone_flops(model, images, run)
    with torch.no_grad():
        _, calibration = _soft(model, reducer, images, run)
        reduced, full = calibration.flops()
    assert len(set(alone)) > 1  # images kept different numbers of tokens
    assert reduced.item() == sum(alone)
    with tokred.applied(model):
        assert full == sum(_alone_flops(model, images, run))


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
    reduced, _ = calibration.flops()
    assert reduced.item() == report.total  # one image: its FLOPs alone are the batch's
    assert [int(out.item()) for _, out, _ in calibration.counts] == tokens
    assert tokens[-1] < 65  # the thresholds did act


@pytest.fixture(scope="module")
def digits():
    images, labels = load_reference_train_data()
    return [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_calibrate_reaches_the_target_within_the_tolerance(digits, target, tmp_path):
    """On the reference model: the returned ratio is within the tolerance of the target, and it is
    what the learned thresholds really run, each image alone (brute force); they save and load."""
    model = load_reference_model()
    weights = copy.deepcopy(model.state_dict())
    ratio = tokred.calibrate(model, digits, target_flops=target, epochs=1, progress=False, tolerance=0.01)
    assert abs(ratio - target) <= 0.01
    (reducer,) = tokred.reducers_of(model)
    assert isinstance(reducer, tokred.Thresholds)
    images = torch.cat([batch for batch, _ in digits])
    reduced = sum(_alone_flops(model, images))
    with tokred.applied(model):
        full = sum(_alone_flops(model, images))
    assert ratio == pytest.approx(reduced / full, rel=1e-9)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        want = model(images)
    tokred.save_reducers(tmp_path / "thresholds.json", reducer)
    loaded = tokred.load_reducers(tmp_path / "thresholds.json")
    assert loaded == (reducer,)
    with torch.no_grad():
        assert torch.equal(tokred.apply(load_reference_model(), *loaded)(images), want)


def test_progress_bar_shows_the_ratio_calibrate_returns(digits, capsys):
    ratio = tokred.calibrate(load_reference_model(), digits[:2], target_flops=0.6, progress=True)
    shown = re.findall(r"flops_ratio=([0-9.]+)", capsys.readouterr().err)
    assert shown and shown[-1] == f"{ratio:.3f}"


class _Loader:
    """Batches made on the fly, as a DataLoader does; counts passes and the batches alive at once."""

    def __init__(self, batches):
        self.batches, self.passes, self.alive, self.most_alive = batches, 0, 0, 0

    def __len__(self):
        return len(self.batches)

    def _released(self):
        self.alive -= 1

    def __iter__(self):
        self.passes += 1
        for images, labels in self.batches:
            gc.collect()
            images = images.clone()
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
            weakref.finalize(images, self._released)
            yield images, labels


def test_calibrate_streams_the_data(digits):
    loader = _Loader(digits[:2])
    tokred.calibrate(load_reference_model(), loader, target_flops=0.5, epochs=2, progress=False)
    assert loader.passes >= 3  # two epochs, then at least one pass of the budget search
    assert loader.most_alive <= 2  # never more than the batch in use and the one coming


def test_unreachable_target_warns_and_keeps_the_closest():
    model = tiny_vit()  # merging every A token in each of its 4 blocks leaves about half the FLOPs
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 7, (8,)))]
    with pytest.warns(UserWarning, match="closest FLOPs ratio per image reached is"):
        ratio = tokred.calibrate(model, batches, target_flops=0.01, progress=False)
    assert 0.01 < ratio < 1


def test_calibrate_bad_input(digits):
    model = tiny_vit()
    with pytest.raises(ValueError, match="empty data loader"):
        tokred.calibrate(model, [])
    assert type(model).__name__ == "VisionTransformer" and tokred.reducers_of(model) == ()
    with pytest.raises(ValueError, match="not a one-shot iterator"):
        tokred.calibrate(model, iter(digits))
    with pytest.raises(ValueError, match="not a one-shot iterator"):
        tokred.calibrate(model, (batch for batch in digits))
    with pytest.raises(ValueError, match="target_flops"):
        tokred.calibrate(model, digits, target_flops=0)
    for tolerance in (0, 1, True):
        with pytest.raises(ValueError, match="tolerance"):
            tokred.calibrate(model, digits, tolerance=tolerance)
    assert tokred.reducers_of(model) == ()
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
    ratio = tokred.calibrate(model, batches, target_flops=0.7, epochs=4, lr=0.3, progress=False, forward=run)
    assert abs(ratio - 0.7) <= 0.01  # features used as logits: enough to see the thresholds train
    (reducer,) = tokred.reducers_of(model)
    assert isinstance(reducer, tokred.Thresholds)
