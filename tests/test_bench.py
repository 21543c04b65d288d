"""The embedded reference model, the reducer-spec parser and ``tokred bench`` end to end."""
from __future__ import annotations

import gc
import json
import re
import time

import numpy as np
import pytest
import torch

import tokred
from tokred.cli.bench import JSON_NAME, PLOT_NAME, parse_reducers
from tokred.cli import main
from tokred.reference import (digits_to_unit, load_reference_config, load_reference_data, load_reference_model,
                              preprocess_digits)


@pytest.fixture(scope="module")
def reference():
    return load_reference_model(), *load_reference_data()


# reference model ----------------------------------------------------------------------------
def test_reference_model_accuracy_matches_config(reference):
    model, images, labels = reference
    config = load_reference_config()
    assert not model.training
    assert images.dtype == torch.float32 and tuple(images.shape[1:]) == tuple(config["input_size"])
    assert labels.dtype == torch.long and len(labels) == len(images) == config["dataset"]["num_test"]
    assert sorted(labels.unique().tolist()) == list(range(10))
    with torch.no_grad():
        predictions = torch.cat([model(images[i:i + 128]).argmax(-1) for i in range(0, len(images), 128)])
    accuracy = (predictions == labels).float().mean().item()
    assert accuracy == pytest.approx(config["test_accuracy"], abs=0.005)
    assert accuracy > 0.9


def test_reference_normalisation_is_train_statistics(reference):
    _, images, _ = reference
    norm = load_reference_config()["normalisation"]
    assert 0 < norm["std"] < 1 and 0 < norm["mean"] < 1
    unit = images * norm["std"] + norm["mean"]  # undo the normalisation: pixels back in [0, 1]
    assert unit.min().item() >= -1e-5 and unit.max().item() <= 1 + 1e-5


def test_digits_preprocessing():
    raw = np.zeros((2, 8, 8), dtype=np.uint8)
    raw[0] = 16
    raw[1, :, 4:] = 8
    unit = digits_to_unit(raw)
    assert unit.shape == (2, 1, 32, 32) and unit.dtype == torch.float32
    assert torch.allclose(unit[0], torch.ones(1, 32, 32))
    assert torch.allclose(unit[1, 0, :, :14], torch.zeros(32, 14)) and torch.allclose(unit[1, 0, :, 18:], torch.full((32, 14), 0.5))
    assert torch.allclose(preprocess_digits(raw, 0.25, 0.5), (unit - 0.25) / 0.5)


def test_missing_assets_give_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKRED_ASSETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="reference_vit.json"):
        load_reference_model()


# reducer specs (the grammar itself: tests/test_registry.py) -----------------------------------
def test_parse_reducers_settings():
    settings = parse_reducers("none, tome:r=8,tome:r=16,tome:r=[4;2],tome:r=8;-0.5/prop_attn=false,"
                              "tome:r=2+pool:stride=2")
    assert [label for label, _ in settings] == ["none", "tome:r=8", "tome:r=16", "tome:r=[4;2]",
                                                "tome:r=8;-0.5/prop_attn=false", "tome:r=2+pool:stride=2"]
    assert [reducers for _, reducers in settings] == [
        (), (tokred.ToMe(r=8),), (tokred.ToMe(r=16),), (tokred.ToMe(r=[4, 2]),),
        (tokred.ToMe(r=(8, -0.5), prop_attn=False),), (tokred.ToMe(r=2), tokred.Pool(stride=2))]
    assert parse_reducers(" NONE ") == [("none", ())]


@pytest.mark.parametrize("spec, message", [
    ("foo:r=1", "unknown reducer 'foo'"),
    ("tome:x=1", "unknown parameter 'x'"),
    ("tome:r", "expected key=value"),
    ("tome:r=", "expected key=value"),
    ("tome:r=-1", "r must be >= 0"),
    ("tome:r=a(b", "cannot parse"),
    ("tome:r=8.5", "not a valid schedule"),
    ("tome:prop_attn=1", "prop_attn"),
    ("tome:r=2/r=4", "twice"),
    ("none:r=2", "stands alone"),
    ("tome:r=(8,-0.5)", "items are separated by ';'"),  # the old grammar
])
def test_parse_reducers_invalid_specs(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_reducers(spec)


def test_parse_reducers_rejects_duplicates_and_empty_items():
    with pytest.raises(ValueError, match="twice"):
        parse_reducers("tome:r=4,tome:r=4")
    with pytest.raises(ValueError, match="empty"):
        parse_reducers("none,,tome:r=4")


def test_cli_reports_bad_spec(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--reducers", "none,tomee:r=4", "--no-progress"])
    assert exit_info.value.code == 2
    assert "unknown reducer 'tomee'" in capsys.readouterr().err



def test_cli_applies_compositions_and_reports_their_errors(capsys):
    # a composition is one setting; two reducers at the vision stage are refused before any batch runs
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--reducers", "none,tome:r=2+pool:stride=2", "--no-progress"])
    assert exit_info.value.code == 2
    assert "two reducers at the 'vision' stage" in capsys.readouterr().err


# tokred bench end to end --------------------------------------------------------------------
def _expected_tokens(num_tokens: int, num_prefix: int, r: int, depth: int) -> int:
    for _ in range(depth):
        num_tokens -= min(r, (num_tokens - num_prefix) // 2)
    return num_tokens


def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--reducers", "none,tome:r=4", "--rounds", "1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "tome:r=4" in printed and str(out / JSON_NAME) in printed

    report = json.loads((out / JSON_NAME).read_text())
    assert {"settings", "versions", "full", "results", "num_images", "has_labels"} <= report.keys()
    assert report["versions"]["torch"] == torch.__version__
    assert {"timm", "tokred"} <= report["versions"].keys()
    assert report["settings"]["reducers"] == ["none", "tome:r=4"]
    assert report["has_labels"] is True
    config = load_reference_config()
    assert report["num_images"] == config["dataset"]["num_test"]
    rows = {row["reducer"]: row for row in report["results"]}
    assert set(rows) == {"none", "tome:r=4"}
    keys = {"tokens_final", "gflops_per_image", "gmacs_per_image", "flops_ratio", "throughput_ratio",
            "throughput_ratio_quartiles", "top1", "agreement", "times_s"}
    for row in rows.values():
        assert keys <= row.keys()
        assert len(row["times_s"]) == 1 and row["throughput_ratio"] > 0

    none, tome = rows["none"], rows["tome:r=4"]
    model = load_reference_model()
    num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    assert none["agreement"] == 1.0
    assert none["flops_ratio"] == pytest.approx(1.0)
    assert none["tokens_final"] == num_tokens
    assert none["top1"] == pytest.approx(config["test_accuracy"], abs=0.005)
    assert none["gflops_per_image"] == pytest.approx(report["full"]["gflops_per_image"])
    image = load_reference_data()[0][:1]
    assert none["gflops_per_image"] == pytest.approx(tokred.flops(model, image).total / 1e9)
    assert none["gmacs_per_image"] == pytest.approx(none["gflops_per_image"] / 2)
    assert report["timing"]["threads"] == report["settings"]["threads"] == 1  # the default
    assert "GMACs/img" in printed and "1 CPU thread" in printed
    assert tome["flops_ratio"] < 1
    assert tome["tokens_final"] == _expected_tokens(num_tokens, model.num_prefix_tokens, 4, len(model.blocks))
    assert 0 < tome["agreement"] <= 1 and 0 < tome["top1"] <= 1

    png = (out / PLOT_NAME).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


# timing statistic ---------------------------------------------------------------------------
def test_timing_rounds_interleave_and_take_the_median_of_per_round_ratios(monkeypatch):
    """Scripted times: the warm-up rounds are dropped, every round runs each model once in rotated
    order, and the ratio is the median of the per-round ratios (not a ratio of medians), with quartiles."""
    from tokred.cli import bench

    model = load_reference_model()
    images = load_reference_data()[0][:4]
    settings = parse_reducers("none,tome:r=2")
    full_times = iter([9.0, 9.0, 1.0, 2.0, 4.0, 8.0, 16.0])  # two warm-up rounds first
    other_times = {"none": iter([9.0, 9.0, 0.5, 2.0, 1.0, 8.0, 16.0]),     # ratios 2, 1, 4, 1, 1 (medians: 4 / 2)
                   "tome:r=2": iter([9.0, 9.0, 2.0, 4.0, 8.0, 16.0, 32.0])}  # ratios 0.5 in every round
    order, threads = [], []

    def scripted(run_model, batch, clock):
        assert clock == "cpu" and not gc.isenabled()  # auto: one thread on the CPU; no garbage collection
        label = next(label for label, m in models.items() if m is run_model)
        order.append(label)
        threads.append(torch.get_num_threads())
        return next(full_times) if label == "full" else next(other_times[label])

    models = {}
    evaluate = bench.evaluate

    def evaluate_and_name(*args, **kwargs):
        evaluation = evaluate(*args, **kwargs)
        models.update({run.label: run.model for run in evaluation.runs})
        return evaluation

    monkeypatch.setattr(bench, "_time", scripted)
    monkeypatch.setattr(bench, "evaluate", evaluate_and_name)
    before = torch.get_num_threads()
    report = bench.run_bench(model, [(images, None)], settings, rounds=5, warmup=2, threads=1, progress=False)
    assert torch.get_num_threads() == before and set(threads) == {1} and gc.isenabled()
    assert order[:6] == ["full", "none", "tome:r=2", "none", "tome:r=2", "full"]  # rotated by one each round
    assert len(order) == 3 * 7
    rows = {row["reducer"]: row for row in report["results"]}
    assert rows["none"]["throughput_ratio"] == 1.0 and rows["none"]["throughput_ratio_quartiles"] == [1.0, 2.0]
    assert rows["none"]["times_s"] == [0.5, 2.0, 1.0, 8.0, 16.0]
    assert rows["tome:r=2"]["throughput_ratio"] == 0.5
    assert report["timing"] == {"clock": "cpu", "threads": 1, "warmup_rounds": 2, "rounds": 5, "batch_size": 4,
                                "device": "cpu", "statistic": report["timing"]["statistic"]}
    described = bench.timing_description(report["timing"])
    assert "median over 5 interleaved rounds" in described and "2 warm-up" in described and "1 CPU thread" in described
    assert "CPU time" in described


def test_cpu_clock_counts_computation_not_waiting():
    from tokred.cli import bench

    class Sleeper(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.05)  # waiting, as for a core another program holds
            return x

    assert bench._time(Sleeper(), torch.zeros(1), "cpu") < 0.02 < 0.05 <= bench._time(Sleeper(), torch.zeros(1), "wall")


def test_bench_timing_bad_input():
    from tokred.cli import bench

    model, images = load_reference_model(), load_reference_data()[0][:2]
    for kwargs in ({"rounds": 0}, {"warmup": -1}, {"threads": 0}):
        with pytest.raises(ValueError, match="must be >= "):
            bench.run_bench(model, [(images, None)], [], progress=False, **kwargs)
    with pytest.raises(ValueError, match="clock must be"):
        bench.run_bench(model, [(images, None)], [], progress=False, clock="tsc")
    with pytest.raises(ValueError, match="the cpu clock times one thread on the CPU"):
        bench.run_bench(model, [(images, None)], [], progress=False, clock="cpu", threads=2)


def test_bench_timm_model_without_data_reports_agreement_only(tmp_path, capsys):
    out = tmp_path / "timm"
    args = ["bench", "--model", "vit_tiny_patch16_224", "--limit", "2", "--batch-size", "2", "--rounds", "1",
            "--reducers", "none,tome:r=8", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "random images" in printed and "n/a" in printed
    report = json.loads((out / JSON_NAME).read_text())
    assert report["has_labels"] is False and report["num_images"] == 2
    rows = {row["reducer"]: row for row in report["results"]}
    assert rows["none"]["top1"] is None and rows["none"]["agreement"] == 1.0
    assert rows["tome:r=8"]["flops_ratio"] < 1
    assert (out / PLOT_NAME).is_file()


def test_bench_rejects_data_without_model(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--data", str(tmp_path), "--out", str(tmp_path / "x"), "--no-progress"])
    assert exit_info.value.code == 2
