"""evals/dtome_vit.py: DToMe against ToMe at the same r on the reference ViT (one r, the README block)."""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evals"))
import dtome_vit  # noqa: E402


def test_one_r_fills_the_readme_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{dtome_vit.MARKERS[0]}\nold\n{dtome_vit.MARKERS[1]}\ntail\n")
    threads = torch.get_num_threads()
    try:
        assert dtome_vit.main(["--r", "4", "--readme", str(readme), "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = readme.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "reducer" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["none", "ToMe", "DToMe"]
    none, tome, dtome = ([cell.strip() for cell in row.split("|")[1:-1]] for row in rows)
    assert none[2] == "65.0 ± 0.0" and tome[2] == "33.0 ± 0.0"  # 65 - 8 blocks x 4
    mean, spread = (float(x) for x in dtome[2].split(" ± "))
    assert abs(mean - 33.0) < 3 and spread > 0  # the average lands near ToMe's count; images differ
    assert float(tome[3]) < 1 and float(dtome[3]) < 1 and "old" not in text and text.endswith("tail\n")
