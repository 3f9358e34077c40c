"""Engine acceptance 2: preemption and crashes lose nothing.

SIGTERM mid-run on 2 ranks -> save + clean exit; `resume=auto` then reproduces the
uninterrupted run's losses bit for bit. kill -9 during a checkpoint write leaves only the
previous complete checkpoint to resume from.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

pytestmark = pytest.mark.slow

STEPS = 8  # the engine runs' length (tests/conftest.py: engine_overrides)


def _overrides(tools, root, run_dir):
    return tools.engine(root, run_dir)


def _losses(tools, run_dir):
    return [(m["step"], m["loss"], m["loss_und"], m["loss_text"], m["loss_gen"], m["grad_norm"]) for m in tools.metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(reference_runs, trainer_tools):
    """The session's uninterrupted 2-rank ZeRO-2 run of the same config."""
    losses = _losses(trainer_tools, reference_runs.two_ranks)
    assert [x[0] for x in losses] == list(range(1, STEPS + 1))
    return losses


def test_sigterm_then_resume_is_bitwise(reference, shapes_root, tmp_path, trainer_tools):
    run_dir = tmp_path / "run"
    ov = _overrides(trainer_tools, shapes_root, run_dir)
    proc = trainer_tools.run(ov, nproc=2, launcher="deepspeed", wait=False, env={"JANUS_FAULT": "step_sleep:1.5"}, log_path=str(tmp_path / "first.log"))
    metrics = run_dir / "metrics.jsonl"
    trainer_tools.wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)
    trainer_tools.signal_group(proc)  # SIGTERM to the launcher and both ranks
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted", status
    stopped_at = status["step"]
    assert 3 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").is_file()
    r = trainer_tools.run(ov + ["resume=auto"], nproc=2, launcher="deepspeed", timeout=900)
    assert r.returncode == 0, r.stdout[-4000:]
    assert _losses(trainer_tools, run_dir) == reference  # every logged value, bit for bit


def test_kill_during_checkpoint_write_resumes_from_previous(reference, shapes_root, tmp_path, trainer_tools):
    run_dir = tmp_path / "run"
    ov = _overrides(trainer_tools, shapes_root, run_dir)
    proc = trainer_tools.run(ov, nproc=2, launcher="deepspeed", wait=False, env={"JANUS_FAULT": "save_sleep:4:60"}, log_path=str(tmp_path / "first.log"))
    ckpts = run_dir / "checkpoints"
    trainer_tools.wait_for(lambda: ckpts.is_dir() and any(p.name.startswith(".tmp-step_00000004") for p in ckpts.iterdir()), proc)
    time.sleep(1.0)  # well inside the 60 s write
    trainer_tools.signal_group(proc, signal.SIGKILL)
    assert any(p.name.startswith(".tmp-step_00000004") for p in ckpts.iterdir())
    assert not (ckpts / "step_00000004").exists()
    r = trainer_tools.run(ov + ["resume=auto"], nproc=2, launcher="deepspeed", timeout=900)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "resuming from" in r.stdout + r.stderr and "step_00000002" in r.stdout + r.stderr
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    # Steps 3-4 ran twice (before the kill and after the resume); the resume cut the log back to
    # step 2, so it holds each step once, equal to the uninterrupted run.
    losses = _losses(trainer_tools, run_dir)
    by_step = {}
    for entry in losses:
        by_step.setdefault(entry[0], set()).add(entry)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert len(losses) == STEPS, [e[0] for e in losses]
    for step, ref in zip(range(1, STEPS + 1), reference):
        assert by_step[step] == {ref}, step


def test_resume_with_another_dp_size_fails_clearly(reference_runs, shapes_root, tmp_path, trainer_tools):
    # With data.sharding=rank each rank's loader position belongs to its own slice of the data
    # (with global sharding a dp change resumes: tests/training/test_topology_change.py).
    ckpt = reference_runs.two_ranks / "checkpoints" / "step_00000006"
    assert (ckpt / "meta.json").is_file()
    ov = _overrides(trainer_tools, shapes_root, tmp_path / "run") + [f"resume={ckpt}", "data.sharding=rank"]
    r = trainer_tools.run(ov, nproc=1, launcher="python", timeout=600)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "config error: parallel: the checkpoint" in r.stderr and "2 data-parallel ranks" in r.stderr


def test_resume_with_other_data_settings_says_what_to_do(reference_runs, shapes_root, tmp_path, trainer_tools):
    # the loader's saved position belongs to the data it was saved with: a changed data.seed
    # (like changed sources or weights) cannot resume it, and the error says what can be done
    ckpt = reference_runs.one_rank / "checkpoints" / "step_00000006"
    assert (ckpt / "meta.json").is_file()
    ov = _overrides(trainer_tools, shapes_root, tmp_path / "run") + [f"resume={ckpt}", "data.seed=99"]
    r = trainer_tools.run(ov, nproc=1, launcher="python", timeout=600)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "config error: data: cannot resume the data stream" in r.stderr, r.stderr[-3000:]
    assert f"model.init_from={ckpt}" in r.stderr and "Traceback" not in r.stderr
