"""Acceptance 1: exact per-step task rows (largest remainder), aligned task-homogeneous
micro-steps on every rank, real:synthetic within 1 sample per step, same seed -> same data."""

from __future__ import annotations

from fractions import Fraction

import pytest

from janus_train.contracts.batch import TASKS
from janus_train.data.mixing import SourceBlender, blend_period, largest_remainder, plan_step

STAGES = [((1, 0, 3), 256), ((2, 3, 5), 512), ((5, 1, 4), 128)]
DP = [1, 2, 8]


def _reference_lr(ratio, total):
    """Largest remainder written out independently (ties: lower index; none occur here)."""
    s = sum(ratio)
    shares = [Fraction(r * total, s) for r in ratio]
    counts = [int(x) for x in shares]
    order = sorted(range(len(ratio)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def test_largest_remainder_basics():
    assert largest_remainder([2, 3, 5], 512) == [102, 154, 256]
    assert largest_remainder([5, 1, 4], 128) == [64, 13, 51]
    assert largest_remainder([1, 0, 3], 256) == [64, 0, 192]
    assert largest_remainder([1, 1, 1], 4) == [2, 1, 1]
    assert largest_remainder([1, 1, 1], 4, tie_order=[2, 0, 1]) == [1, 1, 2]
    assert largest_remainder([0, 0, 1], 7) == [0, 0, 7]
    with pytest.raises(ValueError, match="positive"):
        largest_remainder([0, 0, 0], 3)


@pytest.mark.parametrize("ratio,gb", STAGES, ids=["1:0:3", "2:3:5", "5:1:4"])
@pytest.mark.parametrize("dp", DP)
@pytest.mark.parametrize("m", [1, 2])
def test_plan_rows_and_alignment(ratio, gb, dp, m):
    for step in range(5):
        # granularity=row: exact row-level largest remainder on every step at every dp size
        p = plan_step(ratio, gb, dp, m, seed=1, step=step, granularity="row")
        assert [p.rows[t] for t in TASKS] == _reference_lr(ratio, gb)
        assert all(sum(p.rank_rows(r).values()) == gb // dp for r in range(dp))
        assert len(p.micro_tasks) == gb // (dp * m) and all(len(x) == dp for x in p.micro_tasks)
        mixed = [j for j in range(len(p.micro_tasks)) if p.micro_step_task(j) == "mixed"]
        assert len(mixed) <= 2  # only at the task boundaries
        # granularity=micro_step (ZeRO-3 safe): largest remainder over aligned micro-steps
        q = plan_step(ratio, gb, dp, m, seed=1, step=step)
        unit = dp * m
        assert [q.rows[t] for t in TASKS] == [unit * c for c in _reference_lr(ratio, gb // unit)]
        assert sum(q.rows.values()) == gb
        for j, per_rank in enumerate(q.micro_tasks):
            task = q.micro_step_task(j)
            assert task != "mixed"
            assert all(names == [task] * m for names in per_rank)  # same task on every rank
        for t, share in zip(TASKS, ratio):
            assert abs(q.rows[t] - gb * share / sum(ratio)) < unit  # within one micro-step of exact
            if share == 0:
                assert q.rows[t] == 0 and p.rows[t] == 0
        if unit == 1:
            assert q.rows == p.rows  # one row per micro-step: both are the row-level rounding


def test_ties_are_broken_by_seed_and_step_and_rotate():
    counts = {t: 0 for t in TASKS}
    seen = set()
    for step in range(60):
        p = plan_step((1, 1, 1), 4, 1, 1, seed=5, step=step)
        assert sorted(p.rows.values()) == [1, 1, 2]
        assert p.rows == plan_step((1, 1, 1), 4, 1, 1, seed=5, step=step).rows
        counts[max(p.rows, key=p.rows.get)] += 1
        seen.add(tuple(p.rows.values()))
    assert len(seen) == 3 and min(counts.values()) >= 10  # every task gets the spare row sometimes


@pytest.mark.parametrize("weights", [[1, 1], [3, 2], [0.3, 0.7], [1, 1, 1], [0.37, 0.63001]])
def test_blender_is_exact_at_sample_level(weights):
    b = SourceBlender(weights)
    total = sum(weights)
    for n in range(1, 2001):
        b.advance(b.peek())
        for w, c in zip(weights, b.counts):
            assert abs(c - w / total * n) < 1.0  # never a whole sample off
        if b.period and n % b.period == 0:
            ints = blend_period(weights)
            assert b.counts == [a * n // b.period for a in ints]  # exact at every period


@pytest.mark.parametrize("ratio,gb", STAGES, ids=["1:0:3", "2:3:5", "5:1:4"])
@pytest.mark.parametrize("dp", DP)
def test_loader_rows_sources_and_determinism(make_cfg, tok, image_cfg, ratio, gb, dp):
    """The real loader, all ranks of a step: rows per task, aligned micro-steps, gen sources."""
    from janus_train.data.loader import build_train_loader

    cfg = make_cfg(ratio=list(ratio), global_batch=gb, seq_len=128)
    loaders = [build_train_loader(cfg, tok, image_cfg, r, dp) for r in range(dp)]
    keys_run1 = []
    for step in range(2):
        per_rank = [next(ld) for ld in loaders]
        plan = plan_step(ratio, gb, dp, 1, cfg.seed, step)
        rows = {t: 0 for t in TASKS}
        real = synth = 0
        for r, mbs in enumerate(per_rank):
            assert len(mbs) == gb // dp  # the same micro-step count on every rank
            for j, mb in enumerate(mbs):
                assert mb.num_rows == 1 and mb.seq_len == 128
                assert mb.meta["task"] == plan.micro_step_task(j) == per_rank[0][j].meta["task"]
                assert set(mb.meta["row_tasks"]) == {mb.meta["task"]}  # task-homogeneous
                mb.validate(image_cfg.num_image_tokens)
                for task, srcs in zip(mb.meta["row_tasks"], mb.meta["sources"]):
                    rows[task] += 1
                    real += srcs.count("real")
                    synth += srcs.count("synthetic")
                keys_run1.append(mb.meta["keys"])
        assert rows == plan.rows
        if dp == 1:
            assert [rows[t] for t in TASKS] == _reference_lr(ratio, gb)
        assert real + synth > 0 and abs(real - synth) <= 1, (real, synth)
    for ld in loaders:
        ld.close()
    # identical seed -> identical output; another seed -> different
    again = [build_train_loader(cfg, tok, image_cfg, r, dp) for r in range(dp)]
    keys_run2 = [mb.meta["keys"] for _ in range(2) for ld in again for mb in next(ld)]
    assert keys_run2 == keys_run1
    other = build_train_loader(make_cfg(ratio=list(ratio), global_batch=gb, seq_len=128, seed=8), tok, image_cfg, 0, dp)
    assert [mb.meta["keys"] for mb in next(other)] != keys_run1[: gb // dp]


def test_row_granularity_loader_matches_row_level_rounding(make_cfg, tok, image_cfg):
    from janus_train.data.loader import build_train_loader

    dp, gb = 8, 128
    cfg = make_cfg(ratio=[5, 1, 4], global_batch=gb, seq_len=128, granularity="row")
    per_rank = [next(build_train_loader(cfg, tok, image_cfg, r, dp)) for r in range(dp)]
    rows = {t: 0 for t in TASKS}
    for mbs in per_rank:
        assert len(mbs) == gb // dp
        for mb in mbs:
            mb.validate(image_cfg.num_image_tokens)
            for t in mb.meta["row_tasks"]:
                rows[t] += 1
    assert [rows[t] for t in TASKS] == _reference_lr((5, 1, 4), gb) == [64, 13, 51]


def test_zero_ratio_turns_a_task_off(make_cfg, tok, image_cfg):
    from janus_train.data.loader import build_train_loader

    ld = build_train_loader(make_cfg(ratio=[0, 0, 1], text=[], und=[]), tok, image_cfg, 0, 1)
    assert ld.active == ["gen"]
    mbs = next(ld)
    assert {mb.meta["task"] for mb in mbs} == {"gen"}
