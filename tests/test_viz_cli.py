"""``tokred viz``: the per-layer source picture from the command line."""
from __future__ import annotations

import socket

import pytest
from PIL import Image

from tokred.cli import main
from tokred.cli.viz import PATCH_PIXELS

PAD, PER_ROW = 8, 5  # layout of tokred.viz.save_sources


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _sheet_size(panels: int, side: int) -> tuple[int, int]:
    """Size of a save_sources sheet with ``panels`` square panels (input included) of ``side`` pixels."""
    title = max(10, min(18, side // 14)) + 8
    rows = -(-panels // PER_ROW)
    return PAD + min(panels, PER_ROW) * (side + PAD), PAD + rows * (title + side + PAD)


@pytest.mark.parametrize("layers, panels", [(None, 1 + 8), ("2,5", 3)])
def test_reference_model_png(tmp_path, capsys, layers, panels):
    out = tmp_path / "sub" / "viz.png"
    argv = ["viz", "--out", str(out)] + ([] if layers is None else ["--layers", layers])
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == str(out)
    assert "tome:r=4" in printed and "[61, 57, 53, 49, 45, 41, 37, 33]" in printed
    side = 8 * PATCH_PIXELS  # the reference model's 8x8 patch grid
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == _sheet_size(panels, side)


def test_pruning_reducer_and_digit_index(tmp_path, capsys):
    out = tmp_path / "random.png"
    assert main(["viz", "--reducer", "random:keep=0.5", "--index", "3", "--layers", "0", "--out", str(out)]) == 0
    assert "held-out digit 3" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.size == _sheet_size(2, 8 * PATCH_PIXELS)


def test_timm_model_with_sample_image(tmp_path):
    out = tmp_path / "timm.png"
    assert main(["viz", "--model", "vit_tiny_patch16_224", "--reducer", "tome:r=16", "--layers", "-1",
                 "--out", str(out)]) == 0
    with Image.open(out) as png:
        assert png.size == _sheet_size(2, 14 * PATCH_PIXELS)


@pytest.mark.parametrize("argv, message", [
    (["--reducer", "tomee:r=4"], "unknown reducer 'tomee'"),
    (["--reducer", "tome:r=-1"], "r must be >= 0"),
    (["--reducer", "tome:x=1"], "unknown parameter 'x'"),
    (["--layers", "2,x"], "--layers must be"),
    (["--layers", "8"], "out of range"),
    (["--index", "100000"], "--index must be in"),
    (["--pretrained"], "--pretrained needs --model"),
    (["--image", "does/not/exist.png"], "not found"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, argv, message):
    out = tmp_path / "never.png"
    with pytest.raises(SystemExit) as exit_info:
        main(["viz", *argv, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tokred viz: error:") and message in err
    assert not out.exists()
