"""The per-stage lr schedule: linear warmup, then constant (the paper) or a linear / cosine decay
to a floor reached exactly at the stage's last step."""

from __future__ import annotations

import math

import pytest
import torch

from janus_train.training.optim import build_optimizer, lr_factor


def test_constant_after_warmup():
    f = lr_factor(4, 100, "constant")
    assert [f(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(99) == 1.0 and lr_factor(0, 10)(0) == 1.0


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_runs_from_peak_to_floor(decay):
    f = lr_factor(10, 110, decay, min_lr_ratio=0.1)
    assert f(9) == 1.0 and f(10) == 1.0  # warmup ends at the peak, the decay starts there
    assert f(109) == pytest.approx(0.1)  # the floor at the stage's last update
    assert f(500) == pytest.approx(0.1)  # and held past it
    mid = f(10 + 99 // 2)
    expect = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * (49 / 99))) if decay == "cosine" else 1 - 49 / 99)
    assert mid == pytest.approx(expect)
    values = [f(k) for k in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises


def test_unknown_decay_names_it():
    with pytest.raises(ValueError, match="'step'"):
        lr_factor(0, 10, "step")


def test_optimizer_follows_the_schedule():
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model, 1e-2, (0.9, 0.95), 1e-8, 0.0, 0, total_steps=5, decay="linear", min_lr_ratio=0.0)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])
