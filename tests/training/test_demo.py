"""Engine acceptance 7: the demo (real deepspeed launcher, 2 CPU ranks, 3 stages) runs and
every task's loss falls. (Its duration is a benchmark figure, docs/performance.md, not a test.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from janus_train.tools.demo import loss_trend

pytestmark = pytest.mark.slow


def test_demo_runs_and_losses_fall(tmp_path):
    r = subprocess.run([sys.executable, "-m", "janus_train.tools.demo", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "falls" in r.stdout and "DOES NOT FALL" not in r.stdout
    run = tmp_path / "run"
    for stage in (1, 2, 3):
        assert (run / "exports" / f"stage{stage}" / "model.safetensors").is_file()
    assert list((run / "samples").glob("*.png"))


def test_loss_trend_detects_a_flat_task():
    rows = [{"loss_und": 5.0, "loss_text": None, "loss_gen": 5.0 - 0.1 * i} for i in range(10)]
    trend = loss_trend(rows)
    assert trend["text"] is None
    assert trend["und"] == (5.0, 5.0)
    assert trend["gen"][1] < trend["gen"][0]
