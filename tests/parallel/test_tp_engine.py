"""Acceptance 1-2 of the scale issue through the real entry point (launch/train.py):
parallel.tp=2 trains like tp=1, and checkpoints move between TP sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
TOL = 1e-5
STEPS = 3  # of the engine runs (tests/conftest.py), enough for a checkpoint at step 2


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {m["step"]: m for m in rows}


@pytest.fixture(scope="module")
def runs(shapes_root, tmp_path_factory, reference_runs, trainer_tools):
    """The engine run at tp=2 (2 ranks, 3 steps, with an HF export) and at tp=1 (the session's
    one-rank reference); checkpoints after step 2."""
    base = tmp_path_factory.mktemp("tp_runs")
    trainer_tools.checked(
        trainer_tools.engine(shapes_root, base / "tp2", "parallel.tp=2", "checkpoint.export_hf=true", f"train.stages.stage2.steps={STEPS}"),
        nproc=2, launcher="torchrun",
    )
    (base / "tp1").symlink_to(reference_runs.one_rank)
    return base


def test_tp2_through_launch_matches_tp1(runs):
    tp2, tp1 = _metrics(runs / "tp2"), _metrics(runs / "tp1")
    assert sorted(tp2) == [1, 2, 3] and sorted(tp1)[:3] == [1, 2, 3]
    for step in tp2:
        assert abs(tp2[step]["loss"] - tp1[step]["loss"]) <= TOL * abs(tp1[step]["loss"]), step
        for task in ("und", "text", "gen"):
            a, b = tp2[step][f"loss_{task}"], tp1[step][f"loss_{task}"]
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= TOL * abs(b)), (step, task)
    meta = json.loads((runs / "tp2" / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert (meta["tp"], meta["world_size"], meta["dp_size"]) == (2, 2, 1)


def test_tp2_checkpoints_and_export_are_whole(runs):
    from janus_train.checkpoint.io import load_pretrained, read_checkpoint
    from janus_train.models.janus.keys import native_shapes

    cfg, sd = read_checkpoint(runs / "tp2" / "checkpoints" / "step_00000002" / "model")
    assert {k: tuple(v.shape) for k, v in sd.items()} == native_shapes(cfg)
    exported = load_pretrained(runs / "tp2" / "exports" / "stage2")  # HF layout, strict load
    assert exported.lm_head.weight.shape[0] == cfg.llm.vocab_size


@pytest.mark.parametrize("src,dst", [("tp2", 1), ("tp1", 2)])
def test_checkpoint_resumes_at_other_tp(runs, shapes_root, trainer_tools, src, dst):
    """Resume step 3 from the step-2 checkpoint at the other TP size: same loss as the
    uninterrupted run's step 3 (the loss is taken before the update, so it sees the weights)."""
    run_dir = runs / f"{src}_to_tp{dst}"
    ckpt = runs / src / "checkpoints" / "step_00000002"
    ov = trainer_tools.engine(shapes_root, run_dir, f"parallel.tp={dst}", f"resume={ckpt}", f"train.stages.stage2.steps={STEPS}")
    trainer_tools.checked(ov, nproc=dst, launcher="torchrun" if dst > 1 else "python")
    resumed, original = _metrics(run_dir), _metrics(runs / src)
    assert sorted(resumed) == [3]
    assert abs(resumed[3]["loss"] - original[3]["loss"]) <= TOL * abs(original[3]["loss"])
