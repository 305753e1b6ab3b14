"""bench/gpu.sh as prepared for a GPU machine, run on CPU (``--device cpu``: the tiny shape, the same steps): the
bf16 parity gate, the engine table at several stream counts with the KV memory and position tables, the capacity
line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GUARDPROXY_BENCH_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["dtype_name"] == "bfloat16" and 0 < parity["vs_float32"]["max_prob_error"] <= 0.05
    r = json.loads((out / "engine.json").read_text())
    assert r["dtype"] == "bfloat16" and sorted(r["engine"], key=int) == ["1", "4"]
    assert all(v > 0 for v in r["engine"].values()) and set(r["gemm"]) == {"1", "4"}
    shared, copied = (r["kv_choices"][-1][k] for k in ("positions_shared", "positions_copied"))
    assert r["kv_choices"][-1]["choices"] == 4 and shared == 32 + 4 * 16 < copied == 4 * (32 + 16)
    assert list(r["positions"]["ms_per_token"]) == ["64", "512"]
    assert "| 4 |" in (out / "engine.md").read_text()
    assert "streams at 30 tokens/s" in (out / "capacity.txt").read_text()
