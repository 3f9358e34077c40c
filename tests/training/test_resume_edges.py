"""Resuming a run_dir after its schedule changed or a job died (issue 14).

One 1-rank engine run (tests/conftest.py: engine_overrides, stage 2 alone, a linear lr decay from
step 0 so the schedule's length shows in every lr) is trained 4 steps, then rerun with 8 (it must
continue the finished stage and export it again), then rerun after losing the checkpoints past
step 4 (a crash: steps 5-8 run twice, and must be logged once), then rerun unchanged (nothing to
train). DeepSpeed's zero_to_fp32.py runs on one of its checkpoints with its default arguments.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from janus_train.checkpoint.io import read_checkpoint
from janus_train.training.optim import lr_factor

pytestmark = pytest.mark.slow

LR, MIN_LR_RATIO = 1.0e-3, 0.1  # tiny_demo's stage 2


def _overrides(tools, root, run_dir, steps):
    return tools.engine(root, run_dir, f"train.stages.stage2.steps={steps}", "train.stages.stage2.warmup_steps=0",
                        "train.stages.stage2.decay=linear", "checkpoint.export_hf=true", "logging.wandb.enabled=true")


def _weights(path):
    return read_checkpoint(path)[1]


def _status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


def wandb_history_steps(path: Path) -> list[int]:
    """The steps of the history records of an offline W&B run file (LevelDB log blocks of
    protobuf `Record`s after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    pos, raw, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            raw.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            raw.append(buf + chunk)
    steps = []
    for r in raw:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(r)
        if rec.WhichOneof("record_type") == "history":
            steps.append(rec.history.step.num)
    return steps


@pytest.fixture(scope="module")
def runs(shapes_root, tmp_path_factory, trainer_tools):
    tmp = tmp_path_factory.mktemp("resume_edges")
    run_dir = tmp / "run"
    out = types.SimpleNamespace(run_dir=run_dir)
    trainer_tools.checked(_overrides(trainer_tools, shapes_root, run_dir, 4))
    out.short = trainer_tools.metrics(run_dir)
    out.export_short = _weights(run_dir / "exports" / "stage2")
    # The same run_dir with a longer stage 2, slowed down so status.json can be read mid-run.
    log = tmp / "longer.log"
    proc = trainer_tools.run(_overrides(trainer_tools, shapes_root, run_dir, 8), wait=False, env={"JANUS_FAULT": "step_sleep:1"}, log_path=str(log))
    seen = []

    def training_step_6():
        f = run_dir / "status.json"
        s = json.loads(f.read_text()) if f.is_file() else {}
        if s.get("state") == "running":
            seen.append(s)
        return s.get("state") == "running" and s.get("step", 0) >= 6

    trainer_tools.wait_for(training_step_6, proc)
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    out.running, out.longer_log = seen[-1], log.read_text()
    out.longer, out.longer_status = trainer_tools.metrics(run_dir), _status(run_dir)
    out.export_longer = _weights(run_dir / "exports" / "stage2")
    out.ckpt_longer = _weights(run_dir / "checkpoints" / "step_00000008" / "model")
    # A crash after step 8 was logged but before checkpoints 6 and 8 were durable.
    for name in ("step_00000006", "step_00000008"):
        shutil.rmtree(run_dir / "checkpoints" / name)
    r = trainer_tools.checked(_overrides(trainer_tools, shapes_root, run_dir, 8))
    out.rerun_log = r.stdout + r.stderr
    out.rerun = trainer_tools.metrics(run_dir)
    # Unchanged: nothing left to train.
    r = trainer_tools.checked(_overrides(trainer_tools, shapes_root, run_dir, 8))
    out.done_log, out.done_status, out.done = r.stdout + r.stderr, _status(run_dir), trainer_tools.metrics(run_dir)
    return out


def test_longer_stage_continues_from_its_end(runs):
    assert [m["step"] for m in runs.short] == [1, 2, 3, 4]
    assert [m["step"] for m in runs.longer] == list(range(1, 9))
    assert runs.longer_status["state"] == "completed"
    assert (runs.longer_status["stage"], runs.longer_status["step"], runs.longer_status["stage_step"]) == (2, 8, 8)
    # Steps 1-4 followed the 4-step schedule, 5-8 the 8-step one (from the first continued update).
    short, long = lr_factor(0, 4, "linear", MIN_LR_RATIO), lr_factor(0, 8, "linear", MIN_LR_RATIO)
    assert [m["lr"] for m in runs.longer[:4]] == pytest.approx([LR * short(k) for k in range(4)], rel=1e-6)
    assert [m["lr"] for m in runs.longer[4:]] == pytest.approx([LR * long(k) for k in range(4, 8)], rel=1e-6)
    assert "resuming from" in runs.longer_log and "step 4/8 in stage" in runs.longer_log


def test_longer_stage_is_exported_again_at_its_new_end(runs):
    assert runs.export_longer.keys() == runs.export_short.keys() == runs.ckpt_longer.keys()
    assert any(not torch.equal(runs.export_longer[k], runs.export_short[k]) for k in runs.export_longer)
    assert all(torch.equal(runs.export_longer[k], runs.ckpt_longer[k]) for k in runs.export_longer)  # the step-8 weights


def test_status_shows_stage_and_step_while_training(runs):
    assert runs.running["state"] == "running"
    assert runs.running["stage"] == 2 and runs.running["step"] >= 6 and runs.running["stage_step"] == runs.running["step"]


def test_metrics_hold_each_step_once_after_a_crash(runs):
    assert "resuming from" in runs.rerun_log and "step_00000004" in runs.rerun_log
    assert [m["step"] for m in runs.rerun] == list(range(1, 9))
    # Same topology: the rerun of steps 5-8 is the first run's, bit for bit.
    key = ("step", "loss", "loss_und", "loss_text", "loss_gen", "grad_norm", "lr")
    assert [tuple(m[k] for k in key) for m in runs.rerun] == [tuple(m[k] for k in key) for m in runs.longer]


def test_wandb_holds_each_step_once(runs):
    files = sorted((runs.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 4  # one offline segment per job, one W&B run id
    assert len({f.name for f in files}) == 1
    steps = [s for f in files for s in wandb_history_steps(f)]
    assert sorted(steps) == list(range(1, 9)), steps


def test_finished_run_trains_nothing_and_says_so(runs):
    assert "nothing to train" in runs.done_log
    assert runs.done_status["state"] == "completed"
    assert (runs.done_status["stage"], runs.done_status["step"]) == (2, 8)
    assert [m["step"] for m in runs.done] == list(range(1, 9))
    assert "INFO janus_train: resuming from" in runs.done_log and "WARNING janus_train" not in runs.done_log


def test_zero_to_fp32_default_invocation(runs, tmp_path):
    ckpt = runs.run_dir / "checkpoints" / "step_00000008"
    assert (ckpt / "latest").read_text().strip() == "ds"
    r = subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "fp32")], cwd=ckpt, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    theirs = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=True)
    ours = _weights(ckpt / "model")
    assert theirs.keys() == ours.keys()
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k


def test_earlier_stage_cannot_grow_once_a_later_one_trained(shapes_root, tmp_path, trainer_tools):
    """Stage 1 finished and stage 2 trained from it: a longer stage 1 is refused, naming the key."""
    run_dir = tmp_path / "run"
    for step, stage in ((2, 1), (3, 2)):
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        meta = {"step": step, "stage": stage, "stage_step": 2 if stage == 1 else 1, "stage_steps": 2, "world_size": 1, "dp_size": 1,
                "tp": 1, "zero_stage": 2, "protect": True}
        (ckpt / "meta.json").write_text(json.dumps(meta))
    r = trainer_tools.run(trainer_tools.base(shapes_root, run_dir, steps=(3, 2, 2)), timeout=600)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "config error: train.stages.stage1.steps: 3, but stage 1 of this run ended after 2 steps" in r.stderr
