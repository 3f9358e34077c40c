"""Fixtures for engine tests: a small shapes dataset + tiny init checkpoint, and a runner that
starts launch/train.py for real (plain python, torchrun or the deepspeed launcher)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "launch" / "train.py")


def base_overrides(root: Path, run_dir: Path, steps=(2, 2, 2)) -> list[str]:
    return [
        "+recipe=tiny_demo",
        f"data.root={root}",
        f"model.init_from={root / 'tiny_init'}",
        f"run_dir={run_dir}",
        "demo_assets.build=false",
        "logging.progress=false",
        "logging.wandb.enabled=false",
        "logging.sample_every=0",
        "data.num_workers=0",
        f"train.stages.stage1.steps={steps[0]}",
        f"train.stages.stage2.steps={steps[1]}",
        f"train.stages.stage3.steps={steps[2]}",
    ]


def run_train(overrides: list[str], nproc: int = 1, launcher: str = "python", timeout: int = 600, env: dict | None = None, wait: bool = True, log_path: str | None = None):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    full_env.update(env or {})
    if launcher == "python":
        cmd = [sys.executable, TRAIN, *overrides]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_free_port()), TRAIN, *overrides]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), TRAIN, *overrides]
    else:
        raise ValueError(launcher)
    if not wait:
        # Output goes to a file: an unread pipe fills up and blocks the ranks mid-step.
        log = open(log_path or os.devnull, "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=REPO, start_new_session=True)
        proc.log_path = log_path
        return proc
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def trainer_tools():
    return types.SimpleNamespace(base=base_overrides, run=run_train, metrics=read_metrics)
