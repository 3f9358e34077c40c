"""Periodic and signal saves write sharded state only (checkpoint/sharded.py).

A periodic checkpoint's model/ holds no weights (config.json names DeepSpeed's shards), each
rank's slice of the weight average sits in ema/; its whole weights, consolidated by DeepSpeed's
own tool (through every reader: read_checkpoint, convert --src-format train), equal bit for bit
those of a run whose stage ends at that step (a whole save, gathered as before).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from janus_train.checkpoint.io import read_checkpoint
from janus_train.checkpoint.sharded import FROM_DEEPSPEED, FROM_EMA, sharded_source

pytestmark = pytest.mark.slow


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.mark.parametrize("zero", [2, 3])
def test_periodic_save_is_sharded_and_consolidates_exactly(zero, shapes_root, tmp_path, trainer_tools):
    common = [f"parallel.zero_stage={zero}", "train.ema_decay=0.5", "checkpoint.every_steps=2"]
    long_run, short_run = tmp_path / "four", tmp_path / "two"
    trainer_tools.checked(trainer_tools.engine(shapes_root, long_run, *common, "train.stages.stage2.steps=4"), nproc=2, launcher="deepspeed")
    trainer_tools.checked(trainer_tools.engine(shapes_root, short_run, *common, "train.stages.stage2.steps=2"), nproc=2, launcher="deepspeed")

    periodic, whole = _ckpt(long_run, 2), _ckpt(short_run, 2)
    assert not any(f.suffix == ".safetensors" for f in (periodic / "model").iterdir()), "a periodic save gathered the weights"
    assert sharded_source(periodic / "model") == FROM_DEEPSPEED and sharded_source(periodic / "model_ema") == FROM_EMA
    assert sorted(f.name for f in (periodic / "ema").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert (periodic / "model" / "tokenizer.json").is_file()
    assert any(f.suffix == ".safetensors" for f in (_ckpt(long_run, 4) / "model").iterdir()), "the stage end must save whole weights"

    for sub in ("model", "model_ema"):
        _, got = read_checkpoint(periodic / sub)
        _, want = read_checkpoint(whole / sub)
        assert set(got) == set(want)
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, f"{sub}: consolidated weights differ from the gathered ones: {bad[:5]}"

    # Offline export of the sharded checkpoint: the same weights (the average, as exports use).
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "janus_train.convert", "--src", str(periodic), "--src-format", "train", "--dst", str(out),
                        "--dst-format", "native"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _, exported = read_checkpoint(out)
    _, want = read_checkpoint(whole / "model_ema")
    assert all(torch.equal(exported[k], want[k]) for k in want)
    assert "weights" not in json.loads((out / "config.json").read_text())


def test_a_checkpoint_without_shards_fails_clearly(shapes_root, tmp_path):
    from janus_train.checkpoint.io import CheckpointError, write_sharded_model_dir

    cfg, _ = read_checkpoint(shapes_root / "tiny_init")
    ckpt = tmp_path / "step_00000002"
    write_sharded_model_dir(ckpt / "model", cfg, FROM_DEEPSPEED)
    with pytest.raises(CheckpointError, match=r"no ds/ directory"):
        read_checkpoint(ckpt / "model")
