"""Scale issue, item 3: a resume on another topology keeps the optimizer.

Each test resumes the step-4 checkpoint of an 8-step engine run (tests/conftest.py:
engine_overrides, data.sharding=global, fp32) on another topology and trains steps 5-8. The
reference is the uninterrupted run on the new topology: with data.sharding=global its batches
are the same rows, and its first 4 steps agree with the old topology's to 1e-5
(test_split_invariance, test_tp_engine), so from the same state its steps 5-8 are what the
resumed run must reproduce: losses and lr within 1e-5, and Adam's moments at step 8 the same
(relative difference of the whole flat state below 1e-4; an optimizer restarted at step 4 is
off by a large fraction, as the control at the end of each test shows: the moments at step 4
against those at step 8 already differ by far more).

    dp 2 -> 1   ZeRO-2, 2 ranks -> 1 rank (the loader's position dealt anew)
    TP 2 -> 1   2 ranks at parallel.tp=2 -> 1 rank (TP slices merged by ds_to_universal)
    ZeRO 2 -> 3 1 rank

plus the refusals that need no training (what DeepSpeed's universal checkpoint cannot do).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TOL = 1e-5
MOMENT_TOL = 1e-4
STEPS = 8  # tests/conftest.py: ENGINE_STEPS
FROM = 4  # the checkpoint resumed


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {m["step"]: m for m in rows}


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _optimizer_state(ckpt: Path) -> dict:
    """Adam's state in DeepSpeed's ZeRO files of a checkpoint, flat, in partition order (same
    topology, same order): {"exp_avg": tensor, "exp_avg_sq": tensor, "step": [..]}."""
    out: dict = {"exp_avg": [], "exp_avg_sq": [], "step": []}
    files = sorted((ckpt / "ds").glob("*optim_states.pt"))
    assert files, ckpt
    for f in files:
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = osd["base_optimizer_state"] if "base_optimizer_state" in osd else osd["optimizer_state_dict"]
        for _, st in sorted(base["state"].items()):
            out["exp_avg"].append(st["exp_avg"].flatten().float())
            out["exp_avg_sq"].append(st["exp_avg_sq"].flatten().float())
            out["step"].append(float(st["step"]))
    return {"exp_avg": torch.cat(out["exp_avg"]), "exp_avg_sq": torch.cat(out["exp_avg_sq"]), "step": out["step"]}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_continues(resumed_dir: Path, reference_dir: Path, source_dir: Path) -> None:
    resumed, reference = _metrics(resumed_dir), _metrics(reference_dir)
    assert sorted(resumed) == list(range(FROM + 1, STEPS + 1)), sorted(resumed)
    for step in resumed:
        a, b = resumed[step], reference[step]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12), (step, a["lr"], b["lr"])  # the schedule's position
        assert abs(a["loss"] - b["loss"]) <= TOL * abs(b["loss"]), (step, a["loss"], b["loss"])
        for task in ("und", "text", "gen"):
            x, y = a[f"loss_{task}"], b[f"loss_{task}"]
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= TOL * abs(y)), (step, task, x, y)
    mine, theirs = _optimizer_state(_ckpt(resumed_dir, STEPS)), _optimizer_state(_ckpt(reference_dir, STEPS))
    assert mine["step"] == theirs["step"] and set(theirs["step"]) == {float(STEPS)}  # Adam's step counter continued
    for key in ("exp_avg", "exp_avg_sq"):
        assert mine[key].shape == theirs[key].shape
        assert _rel(mine[key], theirs[key]) < MOMENT_TOL, (key, _rel(mine[key], theirs[key]))
    # The control: the reference's own moments 4 steps earlier are far outside the tolerance,
    # so an optimizer that restarted (or lost its moments) at step 4 could not pass.
    earlier = _optimizer_state(_ckpt(reference_dir, FROM))
    assert _rel(earlier["exp_avg"], theirs["exp_avg"]) > 100 * MOMENT_TOL
    # The universal form was written once into the source checkpoint, completely.
    src = _ckpt(source_dir, FROM)
    assert (src / "ds_universal" / "latest_universal").read_text().strip() == "ds"
    assert not list(src.glob(".ds_universal-tmp-*"))


def _resume(tools, root, run_dir, source_dir, nproc, *extra):
    ov = tools.engine(root, run_dir, f"resume={_ckpt(source_dir, FROM)}", *extra)
    r = tools.checked(ov, nproc=nproc, launcher="torchrun" if nproc > 1 else "python")
    assert "universal checkpoint" in r.stdout + r.stderr
    return run_dir


def test_dp2_to_dp1_continues_like_one_rank(reference_runs, shapes_root, tmp_path, trainer_tools):
    run_dir = _resume(trainer_tools, shapes_root, tmp_path / "dp1", reference_runs.two_ranks, 1)
    _assert_continues(run_dir, reference_runs.one_rank, reference_runs.two_ranks)


def test_tp2_to_tp1_continues_like_tp1(reference_runs, shapes_root, tmp_path, trainer_tools):
    tp2 = tmp_path / "tp2"
    trainer_tools.checked(trainer_tools.engine(shapes_root, tp2, "parallel.tp=2"), nproc=2, launcher="torchrun")
    meta = json.loads((_ckpt(tp2, FROM) / "meta.json").read_text())
    assert (meta["tp"], meta["world_size"], meta["dp_size"]) == (2, 2, 1)
    run_dir = _resume(trainer_tools, shapes_root, tmp_path / "tp1", tp2, 1)
    _assert_continues(run_dir, reference_runs.one_rank, tp2)


def test_zero2_to_zero3_continues_like_zero3(reference_runs, shapes_root, tmp_path, trainer_tools):
    zero3 = tmp_path / "zero3"
    trainer_tools.checked(trainer_tools.engine(shapes_root, zero3, "parallel.zero_stage=3"))
    run_dir = _resume(trainer_tools, shapes_root, tmp_path / "resumed", reference_runs.one_rank, 1, "parallel.zero_stage=3")
    _assert_continues(run_dir, zero3, reference_runs.one_rank)


# ---- what cannot be converted: one clear message, no training needed ---------------------------


def _fake_checkpoint(run_dir: Path, step: int, **topology) -> Path:
    ckpt = _ckpt(run_dir, step)
    (ckpt / "ds").mkdir(parents=True)
    meta = {"step": step, "stage": 2, "stage_step": step, "stage_steps": STEPS, "world_size": 1, "dp_size": 1, "tp": 1, "zero_stage": 2,
            **topology}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return ckpt


@pytest.mark.parametrize(
    "topology,extra,says",
    [
        # A TP checkpoint from before the TP patterns were recorded: DeepSpeed cannot merge its slices.
        ({"world_size": 2, "tp": 2}, [], "written before janus-train recorded how tensor parallelism splits"),
        # DeepSpeed's ZeRO-3 universal files are flat: only its ZeRO-3 loader reads them.
        ({"zero_stage": 3}, ["parallel.zero_stage=2"], "only its ZeRO-3 loader reads"),
        # ZeRO stage 0 has no partitions to convert.
        ({"zero_stage": 0, "world_size": 2, "dp_size": 2}, ["parallel.zero_stage=0"], "ZeRO stage 0"),
    ],
    ids=["old-tp-checkpoint", "zero3-to-zero2", "zero0"],
)
def test_unconvertible_checkpoint_says_what_to_do(shapes_root, tmp_path, trainer_tools, topology, extra, says):
    ckpt = _fake_checkpoint(tmp_path / "old", FROM, **topology)
    if topology.get("tp", 1) > 1:  # DeepSpeed's files, without universal_checkpoint_info
        for tp in range(2):
            torch.save({"module": {}, "dp_world_size": 1, "mp_world_size": 2}, ckpt / "ds" / f"mp_rank_{tp:02d}_model_states.pt")
            torch.save({"optimizer_state_dict": {}}, ckpt / "ds" / f"zero_pp_rank_0_mp_rank_{tp:02d}_optim_states.pt")
    r = trainer_tools.run(trainer_tools.engine(shapes_root, tmp_path / "run", f"resume={ckpt}", *extra), timeout=600)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"config error: parallel: cannot resume {ckpt} on this topology" in r.stderr, r.stderr[-3000:]
    assert says in r.stderr and f"model.init_from={ckpt}" in r.stderr and "Resume it on its own topology" in r.stderr
    assert "Traceback" not in r.stderr


def test_dp_change_with_rank_sharding_says_what_to_do(shapes_root, tmp_path, trainer_tools):
    ckpt = _fake_checkpoint(tmp_path / "old", FROM, world_size=2, dp_size=2)
    r = trainer_tools.run(trainer_tools.engine(shapes_root, tmp_path / "run", f"resume={ckpt}", "data.sharding=rank"), timeout=600)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"config error: parallel: the checkpoint {ckpt} was written with 2 data-parallel ranks" in r.stderr, r.stderr[-3000:]
    assert "data.sharding=global can" in r.stderr and f"model.init_from={ckpt}" in r.stderr and "Traceback" not in r.stderr
