"""evals/bench_vlm.py end to end on its tiny LLaVA and tiny Qwen2-VL (16 visual tokens each) and its tiny
LLaVA-OneVision video (4 frames x 16 tokens + the newline), in a subprocess (the memory pass changes the
process's malloc settings)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EXPECTED = ["none", "oracle-16",
            "oracle-4", "divprune-4", "random-4", "pool-2x2", "dart-4", "fastv-4",
            "oracle-8", "divprune-8", "random-8", "pool-1x2", "dart-8", "fastv-8"]


def test_bench_vlm_tiny_runs_and_reports_every_configuration(tmp_path):
    out = tmp_path / "bench_vlm.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "evals" / "bench_vlm.py"), "--tiny", "--no-progress",
                           "--threads", "1", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [run["family"] for run in runs] == ["llava", "qwen2_vl", "onevision_video"]  # --family defaults to all

    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| reducer")]
    assert len(table) == sum(len(run["rows"]) for run in runs)
    labels = [line.split("|")[1].strip() for line in table]
    assert labels == [row["reducer"] for run in runs for row in run["rows"]]
    check_video_run(runs[2], done.stdout)

    for run in runs[:2]:
        family = run["family"]
        rows = {row["key"]: row for row in run["rows"]}
        assert list(rows) == EXPECTED, family
        assert run["threads"] == 1 and run["prompt"]["image"] == 16, family
        assert run["prompt"]["markers"] == (2 if family == "qwen2_vl" else 0)

        none = rows["none"]
        assert none["kept"] == 16 and none["flops_ratio"] == 1.0 and none["ttft_ratio"] == 1.0
        assert none["flops"]["prefill"] == rows["oracle-16"]["flops"]["prefill"]
        for key, row in rows.items():
            if key in ("none", "oracle-16"):
                continue
            # every reduction runs fewer FLOPs than the unreduced model, and keeps what it was asked to
            assert row["flops"]["prefill"] < none["flops"]["prefill"], (family, key)
            assert row["kept"] == {"pool-2x2": 4, "pool-1x2": 8}.get(key, row["target"]), (family, key)
            assert row["ttft_s"] > 0 and math.isfinite(row["vs_oracle_bound"]), (family, key)
            if not key.startswith("oracle"):
                assert 0 <= row["selection_share"] < 1 and row["decode_ratio"] > 0, (family, key)
        for k in (4, 8):
            # projector rows without reducer FLOPs compute exactly what the oracle on k tokens computes
            assert rows[f"random-{k}"]["flops"]["prefill"] == rows[f"oracle-{k}"]["flops"]["prefill"], family
            assert rows[f"divprune-{k}"]["flops"]["prefill"] > rows[f"random-{k}"]["flops"]["prefill"], family
            # llm-stage reducers run their first K layers at full length
            assert rows[f"dart-{k}"]["flops"]["prefill"] > rows[f"random-{k}"]["flops"]["prefill"], family
            assert rows[f"fastv-{k}"]["kv_mb"] > rows[f"random-{k}"]["kv_mb"], family
            # the oracle's cache is exactly as long as a projector-stage reducer's
            assert rows[f"oracle-{k}"]["kv_mb"] == rows[f"random-{k}"]["kv_mb"], family


def test_bench_vlm_qwen_oracle_matches_the_reduced_model():
    """The Qwen2-VL oracle (unpatched language model on the kept tokens at their original 3-D
    positions) gives the logits of tokred's projector-stage reduction keeping the same tokens."""
    sys.path.insert(0, str(REPO / "evals"))
    try:
        import bench_vlm
    finally:
        sys.path.remove(str(REPO / "evals"))
    import torch

    import tokred

    family = bench_vlm.Qwen2VL(bench_vlm.QWEN_TINY)
    model = family.build()
    inputs = family.inputs(model, 112, batch=1)
    with torch.inference_mode():
        features = family.visual_features(model, inputs)
        ids = inputs["input_ids"]
        image = (ids[0] == family.image_token).nonzero().squeeze(1)
        first, last = int(image[0]), int(image[-1])
        index = torch.cat([torch.arange(first + 4), torch.arange(last + 1, ids.shape[1])])
        embed = model.model.get_input_embeddings()
        embeds = torch.cat([embed(ids[:, :first]), features[:, :4], embed(ids[:, last + 1:])], dim=1)
        expected = model.lm_head(family.oracle_language_model(model, embeds, inputs, index).last_hidden_state[:, -1:])

        class First(tokred.Random):  # keeps the first 4 tokens, as the oracle does
            def plan_images(self, x, grid=None):
                plan = super().plan_images(x, grid)
                plan.keep = torch.arange(4).expand(x.shape[0], -1)
                return plan

        with tokred.applied(model, First(keep=0.25, stage="projector")):
            got = model(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def check_video_run(run: dict, stdout: str) -> None:
    """HoliTom (both stages) at retain 0.10 and 0.25 on the tiny OneVision video, with an oracle at each
    count it reaches (before and after the inner stage), and the reference's FLOPs formula."""
    rows = {row["key"]: row for row in run["rows"]}
    n = run["prompt"]["image"]
    assert n == 4 * 16 + 1 and run["frames"] == 4 and run["modality"] == "video"
    none = rows["none"]
    assert none["flops"]["prefill"] == rows[f"oracle-{n}"]["flops"]["prefill"]
    text = run["shapes"]["text"]
    d, m, layers, k = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], run["llm_layer"]
    for retain in (0.1, 0.25):
        row = rows[f"holitom-{retain:g}"]
        early, kept = row["early"], row["kept"]
        assert 1 < kept < early < n, row
        assert kept == round(early / 2)  # the inner stage keeps half its span, the newline included (holitom.md §2)
        assert {f"oracle-{early}", f"oracle-{kept}"} <= set(rows)
        # fewer FLOPs than the unreduced model, more than the oracle on the final count (K layers on `early`)
        assert rows[f"oracle-{kept}"]["flops"]["prefill"] < row["flops"]["prefill"] < none["flops"]["prefill"]
        assert 0 <= row["selection_share"] < 1 and math.isfinite(row["vs_oracle_bound"])

        def per_layer(x):
            return 4 * x * d * d + 2 * x * x * d + 2 * x * d * m
        expected = (k * per_layer(early) + (layers - k) * per_layer(kept)) / (layers * per_layer(n))
        assert math.isclose(row["reference_formula_ratio"], expected, rel_tol=1e-12)
        assert f"the reference's FLOPs formula {100 * expected:.1f}%" in stdout
    # the headline: 32 frames x 196 tokens, 10% kept (627), half of them from layer 18 of 28 (314): about 6.8%
    headline = run["headline"]
    assert (headline["tokens"], headline["early"], headline["kept"]) == (6272, 627, 314)
    assert round(100 * headline["ratio"], 1) == 6.8


def test_ratios_are_medians_of_per_round_ratios():
    """TTFT ratio and vs oracle bound pair each row with the rows of the same round (hand-worked, 3 rounds
    where the median of the ratios differs from the ratio of the medians)."""
    sys.path.insert(0, str(REPO / "evals"))
    try:
        import bench_vlm
    finally:
        sys.path.remove(str(REPO / "evals"))
    import tokred

    flops = dict(prefill=100.0)
    specs = [bench_vlm.Spec("none", "none", "—", 16), bench_vlm.Spec("oracle-16", "oracle", "oracle", 16, oracle=16),
             bench_vlm.Spec("oracle-4", "oracle", "oracle", 4, oracle=4),
             bench_vlm.Spec("dart-4", "DART", "llm", 4, (tokred.DART(keep=4, layer=2),))]
    measured = {
        "none": bench_vlm.Measured(ttft=[10.0, 20.0, 30.0], selection=[0, 0, 0], flops=flops, kept=16),
        "oracle-16": bench_vlm.Measured(ttft=[10.0, 20.0, 30.0], lm=[4.0, 8.0, 4.0], flops=flops, kept=16),
        "oracle-4": bench_vlm.Measured(ttft=[6.0, 10.0, 20.0], lm=[1.0, 2.0, 1.0], flops=flops, kept=4),
        "dart-4": bench_vlm.Measured(ttft=[9.0, 12.0, 27.0], selection=[0, 0, 0], flops=flops, kept=4, early=16),
    }
    rows = {row["key"]: row for row in bench_vlm.summarise(specs, measured, num_layers=4, decode_steps=0, batch=1)}
    dart = rows["dart-4"]
    assert math.isclose(dart["ttft_ratio"], 0.9)  # rounds: 0.9, 0.6, 0.9 (ratio of medians: 12 / 20 = 0.6)
    # bounds per round: oracle-4 + K/L (lm at 16 - lm at 4) = 6 + 1.5, 10 + 3, 20 + 1.5
    assert math.isclose(dart["oracle_bound_s"], 13.0)
    assert math.isclose(dart["vs_oracle_bound"], 1.2)  # rounds: 1.2, 0.923, 1.256 (ratio of medians: 12 / 13)
    assert math.isclose(rows["oracle-4"]["ttft_ratio"], 0.6)  # rounds: 0.6, 0.5, 0.667 (ratio of medians: 0.5)
