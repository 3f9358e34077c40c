"""The weight average (train.ema_decay, training/ema.py).

Unit: the update rule, swapping the average in and out, whole weights, checkpoint state.
Engine (slow, the real deepspeed launcher): on 2 ranks under ZeRO-2 and ZeRO-3, every
checkpoint's model_ema/ follows ema_k = d * ema_(k-1) + (1 - d) * weights_k from the weights the
stage started from; frozen parts equal the weights; the stage-end export is the average; a
resumed run ends with the same average bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from janus_train.training.ema import WeightEMA

D = 0.5  # large steps of the average, so a wrong update cannot hide below the tolerance


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 2, bias=False)
        self.b.weight.requires_grad_(False)


def test_update_swap_and_state():
    torch.manual_seed(0)
    m = _Tiny()
    ema = WeightEMA(m, 0.9, zero_stage=0)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    expected = {k: start[k].clone() for k in ("a.weight", "a.bias")}
    for _ in range(3):
        with torch.no_grad():
            for p in m.a.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for k in expected:
            expected[k] = 0.9 * expected[k] + 0.1 * m.state_dict()[k]
    raw = {k: v.clone() for k, v in m.state_dict().items()}
    with ema.swapped_in():
        for k in expected:
            torch.testing.assert_close(m.state_dict()[k], expected[k], rtol=0, atol=1e-6)
        assert torch.equal(m.b.weight, raw["b.weight"])  # frozen: not averaged
    for k, v in raw.items():
        assert torch.equal(m.state_dict()[k], v)  # restored exactly
    whole = ema.full_state_dict()
    assert set(whole) == set(raw)
    torch.testing.assert_close(whole["a.weight"], expected["a.weight"], rtol=0, atol=1e-6)
    assert torch.equal(whole["b.weight"], raw["b.weight"])
    # Checkpoint state and whole weights both restore the same average.
    again = WeightEMA(m, 0.9, zero_stage=0)
    again.load_state_dict(ema.state_dict())
    assert all(torch.equal(again.shadow[k], ema.shadow[k]) for k in ema.shadow)
    fresh = WeightEMA(m, 0.9, zero_stage=0)
    fresh.load_whole(whole)
    assert all(torch.equal(fresh.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(m, 1.0, zero_stage=0)


def test_config_rejects_a_decay_of_one(tmp_path):
    from janus_train.training.config import ConfigError, load_config, validate_config

    with pytest.raises(ConfigError, match="ema_decay"):
        validate_config(load_config(["+recipe=tiny_demo", "train.ema_decay=1.0", f"run_dir={tmp_path}"]), check_paths=False)


def test_config_refuses_an_average_of_lora_runs(tmp_path):
    from janus_train.training.config import ConfigError, load_config, validate_config

    with pytest.raises(ConfigError, match="ema_decay"):
        validate_config(load_config(["+recipe=tiny_finetune", "train.ema_decay=0.99", f"run_dir={tmp_path}"]), check_paths=False)


# ---- through the engine ----------------------------------------------------------------------

def _read(path: Path) -> dict[str, torch.Tensor]:
    from janus_train.checkpoint.io import read_checkpoint

    return read_checkpoint(path)[1]


def _trainable(run_dir: Path) -> set[str]:
    """The stage's trainable weights: those that changed between the first and last checkpoint."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    first, last = _read(ckpts[0] / "model"), _read(ckpts[-1] / "model")
    return {k for k in first if not torch.equal(first[k], last[k])}


def _ema_run(trainer_tools, root: Path, run_dir: Path, *extra: str, nproc: int = 2, launcher: str = "deepspeed") -> Path:
    ov = trainer_tools.engine(root, run_dir, f"train.ema_decay={D}", "checkpoint.every_steps=1", "checkpoint.keep_last=20", *extra)
    trainer_tools.checked(ov, nproc=nproc, launcher=launcher if nproc > 1 else "python")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero2", "zero3", "tp2"])
def test_average_follows_the_weights(layout, shapes_root, tmp_path, trainer_tools):
    """2 ranks: data-parallel under ZeRO-2 and ZeRO-3 (the average split over them), and
    tensor-parallel (TP shards averaged, gathered whole)."""
    extra, launcher = {"zero2": (["parallel.zero_stage=2"], "deepspeed"), "zero3": (["parallel.zero_stage=3"], "deepspeed"),
                       "tp2": (["parallel.tp=2"], "torchrun")}[layout]
    run_dir = _ema_run(trainer_tools, shapes_root, tmp_path / "run", *extra, "checkpoint.export_hf=true", launcher=launcher)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(ckpts) == 8
    trainable = _trainable(run_dir)
    assert trainable and any(k.startswith("llm.") for k in trainable)
    init = _read(shapes_root / "tiny_init")
    prev = {k: init[k].float() for k in trainable}
    for c in ckpts:
        weights, ema = _read(c / "model"), _read(c / "model_ema")
        assert set(ema) == set(weights)
        for k in weights:
            if k in trainable:
                want = D * prev[k] + (1 - D) * weights[k]
                torch.testing.assert_close(ema[k], want, rtol=0, atol=1e-6, msg=f"{c.name} {k}")
                prev[k] = ema[k]
            else:
                assert torch.equal(ema[k], weights[k]), f"{c.name} {k}: frozen, must equal the weights"
    # The stage's export is the average, not the last step's weights.
    exported = _read(run_dir / "exports" / "stage2")
    last_ema, last = _read(ckpts[-1] / "model_ema"), _read(ckpts[-1] / "model")
    k = next(k for k in sorted(trainable) if k in exported)
    assert torch.equal(exported[k], last_ema[k]) and not torch.equal(exported[k], last[k])


@pytest.mark.slow
def test_resumed_average_is_bitwise(shapes_root, tmp_path, trainer_tools):
    ref = _ema_run(trainer_tools, shapes_root, tmp_path / "ref", nproc=1)
    run_dir = tmp_path / "resumed"
    shutil.copytree(ref, run_dir)
    for c in (run_dir / "checkpoints").glob("step_*"):
        if int(c.name.split("_")[1]) > 5:
            shutil.rmtree(c)
    (run_dir / "checkpoints" / "latest").unlink(missing_ok=True)
    _ema_run(trainer_tools, shapes_root, run_dir, "resume=auto", nproc=1)
    a, b = _read(ref / "checkpoints" / "step_00000008" / "model_ema"), _read(run_dir / "checkpoints" / "step_00000008" / "model_ema")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
