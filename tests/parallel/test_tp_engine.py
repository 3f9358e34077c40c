"""Acceptance 1-2 of the scale issue through the real entry point (launch/train.py):
parallel.tp=2 trains like tp=1, and checkpoints move between TP sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import launch_train, train_overrides

pytestmark = pytest.mark.slow
TOL = 1e-5


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {m["step"]: m for m in rows}


@pytest.fixture(scope="module")
def runs(shapes_data, tmp_path_factory):
    """Three steps at tp=2 (2 ranks, with an HF export) and at tp=1, checkpoints after step 2."""
    base = tmp_path_factory.mktemp("tp_runs")
    launch_train(train_overrides(shapes_data, base / "tp2", "parallel.tp=2", "checkpoint.export_hf=true"), nproc=2)
    launch_train(train_overrides(shapes_data, base / "tp1"), nproc=1)
    return base


def test_tp2_through_launch_matches_tp1(runs):
    tp2, tp1 = _metrics(runs / "tp2"), _metrics(runs / "tp1")
    assert sorted(tp2) == sorted(tp1) == [1, 2, 3]
    for step in tp1:
        assert abs(tp2[step]["loss"] - tp1[step]["loss"]) <= TOL * abs(tp1[step]["loss"]), step
        for task in ("und", "text", "gen"):
            a, b = tp2[step][f"loss_{task}"], tp1[step][f"loss_{task}"]
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= TOL * abs(b)), (step, task)
    meta = json.loads((runs / "tp2" / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert (meta["tp"], meta["world_size"], meta["dp_size"]) == (2, 2, 1)


def test_tp2_checkpoints_and_export_are_whole(runs):
    from janus_train.models.janus.loading import load_pretrained, read_checkpoint
    from janus_train.models.janus.state_dict_adapter import native_shapes

    cfg, sd = read_checkpoint(runs / "tp2" / "checkpoints" / "step_00000002" / "model")
    assert {k: tuple(v.shape) for k, v in sd.items()} == native_shapes(cfg)
    exported = load_pretrained(runs / "tp2" / "exports" / "stage2")  # HF layout, strict load
    assert exported.lm_head.weight.shape[0] == cfg.llm.vocab_size


@pytest.mark.parametrize("src,dst", [("tp2", 1), ("tp1", 2)])
def test_checkpoint_resumes_at_other_tp(runs, shapes_data, src, dst):
    """Resume step 3 from the step-2 checkpoint at the other TP size: same loss as the
    uninterrupted run's step 3 (the loss is taken before the update, so it sees the weights)."""
    run_dir = runs / f"{src}_to_tp{dst}"
    ckpt = runs / src / "checkpoints" / "step_00000002"
    launch_train(train_overrides(shapes_data, run_dir, f"parallel.tp={dst}", f"resume={ckpt}"), nproc=dst)
    resumed, original = _metrics(run_dir), _metrics(runs / src)
    assert sorted(resumed) == [3]
    assert abs(resumed[3]["loss"] - original[3]["loss"]) <= TOL * abs(original[3]["loss"])
