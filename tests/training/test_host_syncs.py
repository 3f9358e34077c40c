"""No host syncs in the train step (issue 15, item 5): a step copies from the device to the host
once, in train_step's closing fetch of its scalars (global counts, loss sums, the trainer's stop
and skip flags, the grad norm).

On CPU every tensor is on the host, so the test wraps the Tensor methods that read a tensor
into Python or copy it to the host (`cpu`, `item`, `tolist`, `numpy`, `__bool__`, `__float__`,
`__int__`, `__index__`), plus the calls whose output size depends on the data (`nonzero`, a
boolean-mask index): on a GPU each of these waits for the device. Counted are the calls made
while `train_step` runs on batches built beforehand (data loading excluded), attributed to the
first caller outside torch; reads of the tensor that a counted `.cpu()` returned are free (it is
the host copy). Asserted: the project's code (janus_train: the step, the models, the trainer
loop) makes at most one per step. DeepSpeed's own reads (its overflow check before a step it may
skip) are reported, not asserted: they are DeepSpeed's semantics (was_step_applied).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import janus_train
from janus_train.contracts.batch import HOST_COUNTS, Doc, PackedBatch, Row, collate, count_on_host
from janus_train.models.families import JANUS, JANUSFLOW
from janus_train.training.step import train_step

PKG = str(Path(janus_train.__file__).resolve().parent)
TORCH = str(Path(torch.__file__).resolve().parent)
READS = ("cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
STEPS = 3  # counted steps, after one warm-up step


# ---- the counter ---------------------------------------------------------------------------------


class HostReads:
    """Counts device-to-host reads (see the module doc) while `counting` is on."""

    def __init__(self):
        self.events: list[tuple[str, str, str]] = []  # (what, owner, site)
        self.counting = False
        self._busy = False
        self._host_copies: dict[int, object] = {}

    def owner(self) -> tuple[str, str]:
        """(who, file:line) of a read: the first caller outside torch (this file's injected code
        counts as the project's). torch.optim's own reads of its step counter (a CPU tensor
        unless capturable, on a GPU too) are `torch.optim`; AdamWSkipNonFinite's gradient check
        (training/optim.py) is `optimizer guard`."""
        frame = sys._getframe(3)  # owner <- record <- wrapper <- the caller
        if frame.f_code.co_filename.startswith(os.path.join(TORCH, "optim")):
            return "torch.optim", f"{frame.f_code.co_filename}:{frame.f_lineno}"
        while frame is not None:
            path = frame.f_code.co_filename
            if not path.startswith(TORCH):
                site = f"{path}:{frame.f_lineno}"
                if path.endswith(os.path.join("janus_train", "training", "optim.py")):
                    return "optimizer guard", site
                if path.startswith(PKG) or path == __file__:
                    return "janus_train", site
                return ("deepspeed" if f"{os.sep}deepspeed{os.sep}" in path else "other"), site
            frame = frame.f_back
        return "other", "?"

    def record(self, what: str, tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            ref = self._host_copies.get(id(tensor))
            if ref is not None and ref() is tensor:
                return  # the host copy a counted .cpu() made
        self.events.append((what, *self.owner()))

    def install(self, mp: pytest.MonkeyPatch) -> None:
        import weakref

        for name in READS:
            orig = getattr(torch.Tensor, name)

            def wrapper(t, *args, _orig=orig, _name=name, **kwargs):
                if not self.counting or self._busy:
                    return _orig(t, *args, **kwargs)
                self.record(_name, t)
                self._busy = True
                try:
                    out = _orig(t, *args, **kwargs)
                finally:
                    self._busy = False
                if _name == "cpu" and isinstance(out, torch.Tensor):
                    self._host_copies[id(out)] = weakref.ref(out)
                return out

            mp.setattr(torch.Tensor, name, wrapper)

        orig_nonzero, orig_getitem = torch.Tensor.nonzero, torch.Tensor.__getitem__
        orig_torch_nonzero = torch.nonzero

        def nonzero(t, *args, **kwargs):
            if self.counting and not self._busy:
                self.record("nonzero", None)
            return orig_nonzero(t, *args, **kwargs)

        def torch_nonzero(t, *args, **kwargs):
            if self.counting and not self._busy:
                self.record("nonzero", None)
            return orig_torch_nonzero(t, *args, **kwargs)

        def getitem(t, index):
            if self.counting and not self._busy:
                parts = index if isinstance(index, tuple) else (index,)
                if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts):
                    self.record("bool-mask index", None)
            return orig_getitem(t, index)

        mp.setattr(torch.Tensor, "nonzero", nonzero)
        mp.setattr(torch, "nonzero", torch_nonzero)
        mp.setattr(torch.Tensor, "__getitem__", getitem)

    @contextlib.contextmanager
    def on(self):
        self.counting = True
        try:
            yield self
        finally:
            self.counting = False

    def by_owner(self) -> Counter:
        return Counter(owner for _, owner, _ in self.events)

    def ours(self) -> list[tuple[str, str, str]]:
        return [e for e in self.events if e[1] == "janus_train"]


@pytest.fixture
def reads(monkeypatch):
    from janus_train.models import attention

    # The by-document SDPA path runs on CPU only (it reads cu_seqlens on the host); a GPU takes
    # the masked one.
    monkeypatch.setattr(attention, "_by_document_pays", lambda *a, **k: False)
    counter = HostReads()
    counter.install(monkeypatch)
    return counter


# ---- tiny models, batches and a real DeepSpeed engine on one gloo process -------------------------


def _janus():
    from janus_train.models.janus.config import tiny
    from janus_train.models.janus.model import JanusModel

    torch.manual_seed(0)
    model = JanusModel(tiny())
    model.init_weights(seed=0)
    return model, JANUS.loss_groups({}, model.config)


def _janusflow():
    from janus_train.models.janusflow.config import JanusFlowConfig
    from janus_train.models.janusflow.model import JanusFlowModel

    torch.manual_seed(0)
    model = JanusFlowModel(JanusFlowConfig.from_preset("janusflow_tiny"))
    model.init_weights(seed=0)
    return model, JANUSFLOW.loss_groups({}, model.config)


def _janus_batches(cfg, step: int, seq_len: int = 64) -> list[PackedBatch]:
    """Two micro-batches mixing und, text and gen documents (the second one without images)."""
    rng = np.random.default_rng(step)
    img_id, n_img, side = cfg.llm.vocab_size - 1, cfg.num_image_tokens, cfg.vision.image_size

    def text(n):
        target = np.ones(n, bool)
        target[0] = False
        return Doc("t", 1, rng.integers(5, 900, n).astype(np.int32), target, n)

    def und():
        ids = np.concatenate([[1], [img_id] * n_img, rng.integers(5, 900, 6)]).astype(np.int32)
        target = np.zeros(len(ids), bool)
        target[-3:] = True
        return Doc("u", 0, ids, target, len(ids), pixels=rng.integers(0, 256, (1, 3, side, side)).astype(np.uint8))

    def gen():
        ids = np.concatenate([rng.integers(5, 900, 5), rng.integers(0, cfg.vq.codebook_size, n_img)]).astype(np.int32)
        target = np.zeros(len(ids), bool)
        target[5:] = True
        return Doc("g", 2, ids, target, 5)

    return [
        collate([Row(None, [und(), text(7)]), Row(None, [gen(), text(9)])], seq_len, 0, img_id),
        collate([Row(None, [text(30)]), Row(None, [text(11), text(5)])], seq_len, 0, img_id),
    ]


def _flow_batches(cfg, step: int, seq_len: int = 128) -> list[PackedBatch]:
    """Two one-row micro-batches: und + 2 gen documents, then 1 gen document alone."""
    from tests.models.test_janusflow import _row

    def row(und: bool, n_gen: int) -> PackedBatch:
        return _row(cfg, und=und, n_gen=n_gen, seq_len=seq_len, seed=1000 * step + int(und))

    batches = [row(True, 2), row(False, 1)]
    for b in batches:  # what collate does for the loader's batches
        b.meta[HOST_COUNTS] = count_on_host(b)
    return batches


@pytest.fixture(scope="module")
def world():
    """One gloo process, as `launch/train.py` without a launcher; torn down after the module."""
    import torch.distributed as dist

    from janus_train.parallel.distributed import init_distributed

    saved = dict(os.environ)  # restored after: later tests launch trainers with this environment
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed(timeout_minutes=5)
    yield info
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _engine(model, zero_stage: int, grad_accum: int = 2):
    from janus_train.parallel import deepspeed_engine as dse
    from janus_train.training.optim import build_optimizer

    opt, sched = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                                 check_finite=zero_stage == 0)  # as the trainer builds it
    cfg = dse.deepspeed_config(zero_stage, micro_batch_rows=2, grad_accum_steps=grad_accum, dp_size=1, grad_clip=1.0,
                               dtype=torch.float32)
    return dse.build_engine(model, opt, sched, cfg)


def _run(engine, groups, batches, reads, touch_all: bool, flags=None, warm_up: bool = True):
    """train_step over `batches` (one list of micro-batches per step), counting from the second
    step on when `warm_up` (the first builds caches once: the pixel table, DeepSpeed's buffers).
    Returns the results and the project's reads of every counted step."""
    results = []
    per_step = []
    if warm_up:
        results.append(train_step(engine, batches[0], 1, None, torch.device("cpu"), torch.float32, touch_all, groups=groups,
                                  flags=flags))
        batches = batches[1:]
    for mbs in batches:
        before = len(reads.ours())
        with reads.on():
            results.append(train_step(engine, mbs, 1, None, torch.device("cpu"), torch.float32, touch_all, groups=groups,
                                      flags=flags))
        per_step.append(reads.ours()[before:])
    return results, per_step


CASES = {
    "janus-zero0": ("janus", 0),
    "janus-zero2": ("janus", 2),
    "janus-zero3": ("janus", 3),
    "janusflow-zero2": ("janusflow", 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_copies_to_the_host_once(case, world, reads, capsys):
    family, zero_stage = CASES[case]
    model, groups = _janus() if family == "janus" else _janusflow()
    make = _janus_batches if family == "janus" else _flow_batches
    batches = [make(model.config, step) for step in range(STEPS + 1)]  # built before counting
    engine = _engine(model, zero_stage)
    touch_all = zero_stage == 3
    results, per_step = _run(engine, groups, batches, reads, touch_all, flags=lambda: [0.0, 0.0])
    for step, events in enumerate(per_step):
        assert len(events) <= 1, f"step {step}: {len(events)} host reads in janus_train: {events}"
        assert [e[0] for e in events] == ["cpu"], events  # the closing fetch, nothing else
    # The optimizer guard (training/optim.py, ours too) reads nothing: off under ZeRO (DeepSpeed
    # checks), and under ZeRO-0 its decision travels in the step's one fetch.
    guard = [e for e in reads.events if e[1] == "optimizer guard"]
    assert not guard, guard
    for res in results:
        assert res.applied and math.isfinite(res.loss) and res.flags == [0.0, 0.0]
        assert (res.grad_norm is None) == (zero_stage == 0)  # ZeRO-0 in fp32 keeps no norm
        assert res.grad_norm is None or res.grad_norm > 0
    with capsys.disabled():  # what DeepSpeed and torch read on their own, for the record
        print(f"\n{case}: host reads in {STEPS} steps by owner: {dict(reads.by_owner())}")
        for (what, owner, site), n in sorted(Counter(reads.events).items()):
            print(f"  {n} x {owner}: {what} at {site}")


def test_the_counter_sees_an_inserted_sync(world, reads, monkeypatch):
    """The test can fail: one `.item()` added to the forward shows up as a second read per step,
    and so does a boolean-mask index (a data-dependent size)."""
    from janus_train.models.janus.model import JanusModel

    model, groups = _janus()
    batches = [_janus_batches(model.config, step) for step in range(3)]
    engine = _engine(model, 2)
    forward = JanusModel.forward

    def with_item(self, batch, touch_all=False):
        out = forward(self, batch, touch_all=touch_all)
        out.loss_sum["und"].item()
        return out

    monkeypatch.setattr(JanusModel, "forward", with_item)
    _, per_step = _run(engine, groups, batches, reads, False)
    assert [len(e) for e in per_step] == [3, 3]  # one per micro-step + the fetch
    assert sum(e[0] == "item" for e in per_step[0]) == 2

    def with_mask(self, batch, touch_all=False):
        out = forward(self, batch, touch_all=touch_all)
        batch.labels[batch.loss_task >= 0]
        return out

    monkeypatch.setattr(JanusModel, "forward", with_mask)
    _, per_step = _run(engine, groups, batches[:2], reads, False)
    assert sorted(e[0] for e in per_step[0]) == ["bool-mask index", "bool-mask index", "cpu"]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_non_finite_loss_is_not_applied(world, reads, zero_stage):
    """A NaN weight makes the loss and gradients non-finite: DeepSpeed (ZeRO-2) or our guard
    (ZeRO-0, its decision from the step's one fetch) skips the update, the step reports
    applied=False, and the weights stay as they were."""
    model, groups = _janus()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    engine = _engine(model, zero_stage)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    results, per_step = _run(engine, groups, [_janus_batches(model.config, step) for step in range(2)], reads, False)
    assert all(not r.applied and not math.isfinite(r.loss) for r in results)
    assert [len(e) for e in per_step] == [1]
    after = dict(engine.module.named_parameters())
    assert all(torch.equal(before[n], after[n].detach()) or torch.isnan(before[n]).any() for n in before)


def test_trainer_loop_folds_its_flags_into_the_fetch(world, reads):
    """Trainer._loop (with _record) over 3 steps: the stop request and the skipped-sample count
    travel in train_step's one fetch; a stop requested during step 2 ends the loop there."""
    from janus_train.logging.mfu import component_sizes
    from janus_train.training.trainer import Trainer

    model, groups = _janus()
    engine = _engine(model, 2)
    batches = [_janus_batches(model.config, step) for step in range(STEPS)]
    records, saves = [], []

    class Loader:
        def __iter__(self):
            return iter(batches)

        def stats(self):
            return {"skipped": {"text": {"src": 2}}}

    stop = types.SimpleNamespace(signum=None)
    fake = types.SimpleNamespace(
        cfg=types.SimpleNamespace(data=types.SimpleNamespace(granularity="doc"), logging=types.SimpleNamespace(every_steps=1),
                                  train=types.SimpleNamespace(max_bad_steps=3), checkpoint=types.SimpleNamespace(every_steps=100)),
        zero_stage=2, loader=Loader(), stage_step=0, global_step=0, bad_in_row=0, skipped_steps=0, engine=engine,
        dp_size=1, dp_group=None, dist=types.SimpleNamespace(device=torch.device("cpu"), world_size=1), dtype=torch.float32,
        loss_groups=groups, ema=None, stop=stop, evaluation=None, model_config=model.config,
        sizes=component_sizes(model.config), peak=None, trainable_components=lambda stage: list(model.COMPONENTS),
        write_status=lambda *a: None, _save=lambda stage: saves.append(fake.global_step),
    )
    fake._record = types.MethodType(Trainer._record, fake)
    fake._call = lambda hook, stage, record: records.append(record)
    stage = types.SimpleNamespace(steps=STEPS, index=0, name="stage1", lr=1e-3)
    step_of_engine = engine.step

    def step_and_signal():  # a signal arrives during the second step
        step_of_engine()
        if fake.global_step == 1:
            stop.signum = 15

    train_step(engine, batches[0], 1, None, torch.device("cpu"), torch.float32, False, groups=groups)  # warm-up
    engine.step = step_and_signal
    with reads.on():
        outcome = Trainer._loop(fake, stage)
    assert outcome == "preempted" and saves == [2] and [r.step for r in records] == [1, 2]
    assert all(r.skipped_samples == 2 and math.isfinite(r.loss) and r.grad_norm for r in records)
    ours = reads.ours()
    assert len(ours) <= 2 and all(e[0] == "cpu" for e in ours), ours  # one per step
