"""Start-up that scales (issue 15 item 1), measured by bench/startup_memory.py: under ZeRO-3 a
rank's start-up peak (with the weights loaded, above the process's baseline) on 2 ranks is
below 0.65 x the 1-rank one, on the `small` preset; and the figures are in status.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_two_ranks_start_with_less_than_065_of_one(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "startup_memory.py"), "--preset", "small", "--ranks", "1", "2",
                        "--work", str(tmp_path)], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    one, two = out["runs"]["1"], out["runs"]["2"]
    for run in (one, two):
        assert 0 < run["baseline_gib"] < run["weights_gib"] <= run["engine_gib"] <= run["first_step_gib"] + 1e-3, run
        assert run["weights_above_baseline_gib"] <= run["goal_weights_above_baseline_gib"], run
    assert two["weights_above_baseline_gib"] < 0.65 * one["weights_above_baseline_gib"], (one, two)
    # The engine's optimizer states are split too.
    assert two["engine_gib"] - two["baseline_gib"] < one["engine_gib"] - one["baseline_gib"]
