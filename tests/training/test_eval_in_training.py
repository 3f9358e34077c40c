"""Evaluation during training: 2 ranks under ZeRO-3 evaluate together at `eval.every_steps`
and at the stage end without hanging, the results land in metrics.jsonl and run_dir/eval/, and
a run stopped by SIGTERM and resumed keeps the schedule."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

STEPS = 6


def _eval_overrides(eval_data) -> list[str]:
    held = eval_data / "heldout"
    return [
        f"eval.data={{und: [{{path: {held / 'und'}}}], text: [{{path: {held / 'text'}}}], gen: [{{path: {held / 'gen'}}}], seq_len: 256}}",
        "eval.every_steps=2",
        "eval.num=3",
        "eval.max_new_tokens=4",
        "eval.scorer=shapes",
    ]


def test_zero3_evaluates_on_schedule_through_a_sigterm(shapes_root, eval_data, tmp_path, trainer_tools):
    run_dir = tmp_path / "run"
    ov = trainer_tools.engine(shapes_root, run_dir, "parallel.zero_stage=3", f"train.stages.stage2.steps={STEPS}", *_eval_overrides(eval_data))
    proc = trainer_tools.run(ov, nproc=2, launcher="deepspeed", wait=False, env={"JANUS_FAULT": "step_sleep:1.5"},
                             log_path=str(tmp_path / "first.log"))
    metrics = run_dir / "metrics.jsonl"
    trainer_tools.wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)
    trainer_tools.signal_group(proc)  # SIGTERM to the launcher and both ranks
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted", status
    assert status["step"] < STEPS
    trainer_tools.checked(ov, nproc=2, launcher="deepspeed")
    rows = trainer_tools.metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    evaluated = [r["step"] for r in rows if "eval/loss_und" in r]
    assert evaluated == [2, 4, 6]  # every 2 steps; step 6 is also the stage end (once)
    for r in rows:
        if r["step"] in evaluated:
            for key in ("eval/loss_und", "eval/loss_text", "eval/loss_gen", "eval/und_acc", "eval/gen_acc"):
                assert isinstance(r[key], float), (r["step"], key)
            assert r["eval_time_s"] > 0
        else:
            assert r["eval_time_s"] is None
    for step in evaluated:
        rep = json.loads((run_dir / "eval" / f"step_{step:08d}" / "report.json").read_text())
        assert rep["docs_und"] == 3 and rep["gen_prompts"] == 3
        assert (run_dir / "eval" / f"step_{step:08d}" / "gen_grid.png").is_file()
