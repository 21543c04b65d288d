"""``tokred sweep``: settings from the registry, numbers checked against an independent run, outputs, --readme."""
from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tokred
from tokred import registry
from tokred.cli import main, sweep
from tokred.reference import load_reference_data, load_reference_model

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep of the reference model over none, tome:r=2, tome:r=6; returns (out dir, printed output)."""
    out = tmp_path_factory.mktemp("sweep")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["sweep", "--specs", "none,tome:r=2,tome:r=6", "--out", str(out), "--no-progress"]) == 0
    return out, printed.getvalue()


def _independent(reducer):
    """Predictions, GFLOPs per image and final tokens of the reference model with ``reducer``, computed here."""
    model = load_reference_model()
    images, labels = load_reference_data()
    with tokred.applied(model, *([] if reducer is None else [reducer])), torch.no_grad():
        predictions = torch.cat([model(images[i:i + 100]).argmax(-1) for i in range(0, len(images), 100)])
        model(images[:1])
        trace = tokred.last_trace(model)
        gflops = tokred.flops(model).total / 1e9
    return predictions, labels, gflops, trace.final_tokens


# settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeToMe(tokred.ToMe):
    """ToMe under another name, to stand for a newly registered family."""


def _register_fake(monkeypatch):
    """Register ``fake`` for this test only."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_names", dict(registry._names))
    tokred.register_reducer("fake")(FakeToMe)


def test_default_families_follow_the_registry(monkeypatch):
    assert sweep.available_families() == [name for name in sweep.SWEEPS if name in tokred.list_reducers()]
    assert {"tome", "pitome"} <= set(sweep.available_families())
    for specs in sweep.SWEEPS.values():  # every listed spec names its family
        assert all(sweep.family_of(spec) for spec in specs)
    # A family listed in SWEEPS runs once its reducer is registered, not before.
    monkeypatch.setitem(sweep.SWEEPS, "fake", ["fake:r=1", "fake:r=3"])
    assert "fake" not in [family for family, _, _ in sweep.sweep_settings()]
    _register_fake(monkeypatch)
    settings = sweep.sweep_settings()
    assert [(f, label, r) for f, label, r in settings if f == "fake"] == [
        ("fake", "fake:r=1", (FakeToMe(r=1),)), ("fake", "fake:r=3", (FakeToMe(r=3),))]
    # Every registered default family parses (no family is skipped with a warning).
    expected = sum(len(sweep.SWEEPS[name]) for name in sweep.available_families())
    assert len(settings) == expected


def test_registered_family_with_bad_default_specs_is_skipped_loudly(monkeypatch, capsys):
    monkeypatch.setitem(sweep.SWEEPS, "fake", ["fake:strength=1"])
    _register_fake(monkeypatch)
    settings = sweep.sweep_settings()
    assert "fake" not in {family for family, _, _ in settings} and settings
    assert "skipped the 'fake' family" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not parse"):  # asked for explicitly: an error
        sweep.sweep_settings(["fake"])


def test_explicit_specs_and_families():
    settings = sweep.sweep_settings(specs="none,tome:r=2,pitome:keep=0.8,tome:r=4;-0.5,tome:r=2+pool:stride=2")
    assert [(f, label) for f, label, _ in settings] == [("tome", "tome:r=2"), ("pitome", "pitome:keep=0.8"),
                                                        ("tome", "tome:r=4;-0.5"),
                                                        ("tome+pool", "tome:r=2+pool:stride=2")]
    assert settings[2][2] == (tokred.ToMe(r=(4, -0.5)),)
    assert settings[3][2] == (tokred.ToMe(r=2), tokred.Pool(stride=2))
    assert [label for _, label, _ in sweep.sweep_settings(["pitome"])] == sweep.SWEEPS["pitome"]


@pytest.mark.parametrize("argv, message", [
    (["--reducers", "tome", "--specs", "tome:r=2"], "not both"),
    (["--reducers", "nosuch"], "no default sweep for 'nosuch'"),
    (["--reducers", "tome,,pitome"], "empty family"),
    (["--specs", "tome:r=2,tomee:r=3"], "unknown reducer 'tomee'"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--data", "."], "--data needs --model"),
])
def test_bad_options_exit_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *argv, "--out", str(tmp_path / "x"), "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# outputs -----------------------------------------------------------------------------------
def test_json_matches_an_independent_run(swept):
    out, _ = swept
    report = json.loads((out / sweep.JSON_NAME).read_text())
    assert report["has_labels"] is True and report["num_images"] == len(load_reference_data()[1])
    assert report["settings"]["specs"] == ["tome:r=2", "tome:r=6"]
    assert report["versions"]["torch"] == torch.__version__
    rows = report["results"]
    assert [(row["family"], row["spec"]) for row in rows] == [("none", "none"), ("tome", "tome:r=2"),
                                                              ("tome", "tome:r=6")]
    assert rows[0] == report["full"]

    full_predictions, labels, full_gflops, full_tokens = _independent(None)
    assert rows[0]["gflops_per_image"] == pytest.approx(full_gflops, rel=1e-12)
    assert rows[0]["flops_ratio"] == 1.0 and rows[0]["agreement"] == 1.0
    assert rows[0]["tokens_final"] == full_tokens == 65
    assert rows[0]["top1"] == pytest.approx((full_predictions == labels).float().mean().item())
    for row, r in zip(rows[1:], (2, 6)):
        predictions, _, gflops, tokens = _independent(tokred.ToMe(r=r))
        assert row["gflops_per_image"] == pytest.approx(gflops, rel=1e-12)
        assert row["flops_ratio"] == pytest.approx(gflops / full_gflops, rel=1e-12)
        assert row["tokens_final"] == tokens
        assert row["top1"] == pytest.approx((predictions == labels).float().mean().item())
        assert row["agreement"] == pytest.approx((predictions == full_predictions).float().mean().item())
    assert rows[1]["flops_ratio"] > rows[2]["flops_ratio"]
    assert rows[2]["tokens_final"] == 17


def test_csv_markdown_and_plot_agree_with_json(swept):
    out, printed = swept
    report = json.loads((out / sweep.JSON_NAME).read_text())
    with open(out / sweep.CSV_NAME, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0].keys()) == sweep.CSV_COLUMNS
    assert len(table) == len(report["results"])
    for line, row in zip(table, report["results"]):
        assert (line["family"], line["spec"]) == (row["family"], row["spec"])
        for key in ("tokens_final", "gflops_per_image", "flops_ratio", "top1", "agreement"):
            assert float(line[key]) == pytest.approx(row[key], rel=1e-12)

    markdown = (out / sweep.MARKDOWN_NAME).read_text()
    assert markdown.strip().endswith(sweep.format_markdown(report))
    assert sweep.format_markdown(report) in printed and str(out / sweep.PLOT_NAME) in printed
    lines = sweep.format_markdown(report).splitlines()
    assert len(lines) == 2 + len(report["results"])
    for line, row in zip(lines[2:], report["results"]):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells == [row["family"], f"`{row['spec']}`", f"{row['tokens_final']:g}",
                         f"{row['gflops_per_image']:.4f}", f"{row['flops_ratio']:.3f}",
                         f"{100 * row['top1']:.2f}%", f"{100 * row['agreement']:.2f}%"]

    png = (out / sweep.PLOT_NAME).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_family_option_runs_the_default_specs(tmp_path):
    out = tmp_path / "families"
    assert main(["sweep", "--reducers", "tome", "--limit", "16", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / sweep.JSON_NAME).read_text())
    assert report["num_images"] == 16 and report["settings"]["families"] == ["tome"]
    assert [row["spec"] for row in report["results"]] == ["none", *sweep.SWEEPS["tome"]]
    ratios = [row["flops_ratio"] for row in report["results"]]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.6


def test_timm_model_without_labels(tmp_path, capsys):
    out = tmp_path / "timm"
    assert main(["sweep", "--model", "vit_tiny_patch16_224", "--limit", "2", "--specs", "tome:r=8",
                 "--out", str(out), "--no-progress"]) == 0
    assert "random images" in capsys.readouterr().out
    report = json.loads((out / sweep.JSON_NAME).read_text())
    assert report["has_labels"] is False
    assert [row["top1"] for row in report["results"]] == [None, None]
    assert report["results"][1]["flops_ratio"] < 1
    assert "n/a" in (out / sweep.MARKDOWN_NAME).read_text()
    with open(out / sweep.CSV_NAME, newline="") as handle:
        assert [line["top1"] for line in csv.DictReader(handle)] == ["", ""]
    assert (out / sweep.PLOT_NAME).stat().st_size > 1000


# --readme ----------------------------------------------------------------------------------
def _split(text):
    head, rest = text.split(sweep.README_START)
    inside, tail = rest.split(sweep.README_END)
    return head, inside, tail


def test_readme_option_rewrites_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    original = README.read_text()
    assert original.count(sweep.README_START) == 1 and original.count(sweep.README_END) == 1
    readme.write_text(original.replace(_split(original)[1], "\nSTALE TABLE\n"))
    out = tmp_path / "out"
    assert main(["sweep", "--specs", "tome:r=2", "--limit", "8", "--out", str(out), "--no-progress",
                 "--readme", str(readme)]) == 0
    head, inside, tail = _split(readme.read_text())
    old_head, _, old_tail = _split(original)
    assert head == old_head and tail == old_tail
    assert "STALE" not in inside
    report = json.loads((out / sweep.JSON_NAME).read_text())
    assert sweep.format_markdown(report) in inside
    assert f"]({sweep.README_IMAGE})" in inside
    assert (tmp_path / sweep.README_IMAGE).read_bytes() == (out / sweep.PLOT_NAME).read_bytes()

    # Rewriting again is idempotent around the markers.
    sweep.update_readme(readme, sweep.format_markdown(report))
    assert _split(readme.read_text()) == (head, inside, tail)


@pytest.mark.parametrize("text", ["no markers here\n", f"{sweep.README_END}\n{sweep.README_START}\n",
                                  f"{sweep.README_START}\n{sweep.README_START}\n{sweep.README_END}\n"])
def test_readme_without_proper_markers_is_left_alone(tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(ValueError, match="marker|before"):
        sweep.update_readme(readme, "| table |")
    assert readme.read_text() == text
