"""DeepSpeed's CPU shared-memory all-reduce leaves a ~66 MB /dev/shm segment per rank behind
unless start-up unlinks it (janus_train/parallel/distributed.py, _release_shm_segment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.parallel.conftest import ROOT, free_port


def test_deepspeed_launch_leaves_no_shm_segment_and_shm_all_reduce_still_works(tmp_path: Path):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(ROOT / "tests/parallel/shm_worker.py"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in range(2)]
    assert all(r["shm_op"] for r in results), "DeepSpeed's shm op was not in use: the test checks nothing"
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert not any(r["own_segment_left"] for r in results)
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert left == [], f"segments left behind: {left}"
