"""The throughput bench runs end to end and reports every figure docs/performance.md quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_data_throughput_bench_smoke(tmp_path):
    cmd = [sys.executable, "bench/data_throughput.py", "--work", str(tmp_path / "b"), "--und-samples", "24", "--gen-samples", "400", "--text-samples", "40", "--steps", "1"]
    p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    runs = {(r["task"], r.get("shards"), r["num_workers"]) for r in out["throughput"]}
    pre = "pre-resized PNG (build_shards --und-resize 384)"
    assert runs == {(t, s, w) for w in (0, 2) for t, s in (("und", "JPEG as given"), ("und", pre), ("gen", None))}
    for r in out["throughput"]:
        assert r["samples"] > 0 and r["samples_per_cpu_second"] > 0 and 0 <= r["pad_fraction"] < 1
    assert set(out["pad_fraction_seq4096_mix_2_3_5"]) == {"und", "text", "gen", "overall"}
