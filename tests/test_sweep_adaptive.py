"""evals/sweep_adaptive.py: one setting of each kind on a few questions of the shipped digits VLM (the
JSON report's schema, the counts each row must have, the README block), and the FLOPs matching of
FastV / DART to ATP against a brute-force scan."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tokred.reference import assets_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evals"))
import sweep_adaptive as sa  # noqa: E402
import vlm_data  # noqa: E402

LABELS = ["none", "ToMe", "ToMe + VTU", "DToMe", "DToMe + VTU", "DivPrune (fixed)", "DivPrune (Budget, ramp)",
          "DivPrune (Budget, tiers)", "ATP", "FastV", "DART", "Matryoshka"]


def test_one_setting_of_each_kind(tmp_path, monkeypatch):
    import torch

    for name, value in (("MERGE_R", (12,)), ("BUDGET_KEEPS", (0.25,)), ("ATP_TARGETS", (0.45,)),
                        ("MATRYOSHKA_TOKENS", (4,)), ("ATP_CALIBRATION", 12), ("MATCH_QUESTIONS", 3)):
        monkeypatch.setattr(sa, name, value)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{sa.README_START}\nold\n{sa.README_END}\ntail\n")
    threads = torch.get_num_threads()
    try:
        assert sa.main(["--per-family", "1", "--calibration", "48", "--questions-dir", str(tmp_path / "q"),
                        "--out", str(tmp_path / "out"), "--readme", str(readme), "--batch-size", "6",
                        "--threads", str(threads), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "out" / sa.JSON_NAME).read_text())
    assert report["families"] == list(vlm_data.FAMILIES) and report["questions"] == 6
    assert report["settings"]["calibration_scenes"] == 48 and set(report["fitted"]) == {
        "dtome r=12", "DivPrune (Budget, ramp) 0.25", "DivPrune (Budget, tiers) 0.25", "atp 0.45",
        "FastV at ATP 0.45", "DART at ATP 0.45"}
    rows = {row["family"]: row for row in report["results"]}
    assert [row["family"] for row in report["results"]] == LABELS
    for row in report["results"]:
        assert set(row["visual_tokens"]) == {"mean", "std", "last_mean", "last_std"}
        assert 0 < row["flops_ratio_per_image"] <= 1.01 and row["answers"]
        assert set(row["families"]) == set(vlm_data.FAMILIES)
        for family in row["families"].values():
            assert family["n"] == 1 and 0 <= family["ci95"][0] <= family["accuracy"] <= family["ci95"][1] <= 1
    spread = {label: row["visual_tokens"] for label, row in rows.items()}
    for label, tokens in (("none", 64), ("ToMe", 16), ("ToMe + VTU", 16), ("DivPrune (fixed)", 16), ("Matryoshka", 4)):
        assert spread[label] == {"mean": tokens, "std": 0, "last_mean": tokens, "last_std": 0}, label
    assert spread["DToMe"] == spread["DToMe + VTU"] and spread["DToMe"]["std"] > 0          # per image, by content
    assert spread["DivPrune (Budget, ramp)"]["std"] > 0 and spread["ATP"]["mean"] == 64 > spread["ATP"]["last_mean"]
    for label in ("FastV", "DART"):
        k = int(re.search(r"keep=(\d+)", rows[label]["spec"]).group(1))
        assert spread[label] == {"mean": 64, "std": 0, "last_mean": k, "last_std": 0}
        cost, atp = map(float, re.findall(r"\d\.\d+", report["fitted"][f"{label} at ATP 0.45"])[-2:])
        assert cost == pytest.approx(atp, abs=0.05)
    assert rows["ToMe + VTU"]["flops_ratio_per_image"] > rows["ToMe"]["flops_ratio_per_image"]   # N-row attention
    text = readme.read_text()
    assert "\nold\n" not in text and "`matryoshka:tokens=4`" in text and text.endswith("tail\n")
    assert sa.README_IMAGE in text
    assert (tmp_path / sa.README_IMAGE).stat().st_size > 10_000


def test_matched_keep_is_the_closest_count():
    """The bisection lands on the count whose per-image language-model FLOPs are closest to the goal,
    as a scan over every count finds it."""
    import tokred
    from tokred.cli import vlm
    from tokred.cli import vlm_sweep as vs

    model, processor = vlm.load(assets_dir() / "digits_vlm")
    questions = vs.read_questions(assets_dir() / "digits_vlm" / "questions.jsonl")[:1]
    make = lambda k: tokred.FastV(keep=k, layer=1)   # noqa: E731
    costs = {k: sa.llm_flops(model, processor, questions, make(k)) for k in range(1, 65)}
    for goal in (costs[20] + 1, (costs[7] + 3 * costs[8]) / 4, costs[1] - 5, costs[64] + 5):
        best = min(costs, key=lambda k: (abs(costs[k] - goal), k))
        assert sa.matched_keep(model, processor, questions, make, goal) == (best, costs[best])
