"""Helpers for the parallelism tests: multi-process launches under torchrun (gloo, CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# bench/ (synthetic batches) is imported by these tests and their workers.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str | Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script args` on `nproc` local ranks; fail the test with the output tail on error."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} {' '.join(args)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def shapes_data(shapes_root) -> Path:
    """The session's shapes dataset + tiny init checkpoint (tests/conftest.py)."""
    return shapes_root


def train_overrides(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """tiny_demo, stage 2 only, 3 steps, a checkpoint after step 2, ZeRO-2, fp32."""
    return [
        "+recipe=tiny_demo", f"data.root={root}", f"model.init_from={root / 'tiny_init'}", f"run_dir={run_dir}",
        "demo_assets.build=false", "logging.progress=false", "logging.wandb.enabled=false", "logging.sample_every=0",
        "data.num_workers=0", "train.stages.stage1.enabled=false", "train.stages.stage3.enabled=false",
        "train.stages.stage2.steps=3", "checkpoint.every_steps=2", "checkpoint.export_hf=false",
        "parallel.zero_stage=2", "parallel.dtype=fp32", *extra,
    ]


def launch_train(overrides: list[str], nproc: int = 1, timeout: int = 400) -> subprocess.CompletedProcess:
    """launch/train.py under torchrun (nproc > 1) or plain python; fails the test on error."""
    train = str(ROOT / "launch" / "train.py")
    if nproc == 1:
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([sys.executable, train, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"launch/train.py exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
        return proc
    return torchrun(nproc, train, *overrides, timeout=timeout)
