"""evals/bench_vlm.py end to end on its tiny LLaVA (16 visual tokens), in a subprocess (the memory pass
changes the process's malloc settings)."""
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
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["key"]: row for row in result["rows"]}
    assert list(rows) == EXPECTED

    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| reducer")]
    assert len(table) == len(EXPECTED)
    labels = [line.split(" | ")[0].lstrip("| ") for line in table]
    assert labels == [row["reducer"] for row in result["rows"]]

    none = rows["none"]
    assert none["kept"] == 16 and none["flops_ratio"] == 1.0 and none["ttft_ratio"] == 1.0
    assert none["flops"]["prefill"] == rows["oracle-16"]["flops"]["prefill"]
    for key, row in rows.items():
        if key in ("none", "oracle-16"):
            continue
        # every reduction runs fewer FLOPs than the unreduced model, and keeps what it was asked to
        assert row["flops"]["prefill"] < none["flops"]["prefill"], key
        assert row["kept"] == {"pool-2x2": 4, "pool-1x2": 8}.get(key, row["target"]), key
        assert row["ttft_s"] > 0 and math.isfinite(row["vs_oracle_bound"]), key
        if not key.startswith("oracle"):
            assert 0 <= row["selection_share"] < 1 and row["decode_ratio"] > 0, key
    for k in (4, 8):
        # projector rows without reducer FLOPs compute exactly what the oracle on k tokens computes
        assert rows[f"random-{k}"]["flops"]["prefill"] == rows[f"oracle-{k}"]["flops"]["prefill"]
        assert rows[f"divprune-{k}"]["flops"]["prefill"] > rows[f"random-{k}"]["flops"]["prefill"]
        # llm-stage reducers run their first K layers at full length
        assert rows[f"dart-{k}"]["flops"]["prefill"] > rows[f"random-{k}"]["flops"]["prefill"]
        assert rows[f"fastv-{k}"]["kv_mb"] > rows[f"random-{k}"]["kv_mb"]
