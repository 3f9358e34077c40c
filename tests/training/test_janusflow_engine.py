"""The engine acceptance tests for JanusFlow, through the real entry point (launch/train.py) on
the tiny JanusFlow shapes world (`flow_shapes_root`, `flow_engine_overrides`): a mixed
und/text/gen stage whose objective is CE + flow + REPA, each with its own global normaliser.

1. The trajectory does not depend on how the global batch is split: 2 ranks (ZeRO-2, ZeRO-3)
   match 1 rank with accumulation within 1e-5 relative.
2. Tensor parallelism: tp=2 trains like tp=1.
3. Resume is bit for bit: from the step-2 checkpoint of the 1-rank run, steps 3-4 log exactly
   the uninterrupted run's values.
4. The stage-end export is DeepSeek's release layout and loads as a JanusFlowModel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TOL = 1e-5
STEPS = 4  # the reference run's length (tests/conftest.py: flow_engine_overrides)
SHORT = 3  # ZeRO-3 and tp=2 runs
LOSSES = ("loss", "loss_und", "loss_text", "loss_flow", "loss_repa")
TOKENS = ("tokens_und", "tokens_text", "tokens_gen")


# ---- the runs, each trained once per module ----------------------------------------------------


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flow_engine_runs")


@pytest.fixture(scope="module")
def one_rank(flow_runs, flow_shapes_root, trainer_tools) -> Path:
    """The reference: 1 rank (8 rows as accumulation steps), 4 steps, checkpoints at 2 and 4."""
    run_dir = flow_runs / "one_rank"
    trainer_tools.checked(trainer_tools.flow_engine(flow_shapes_root, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def zero2(flow_runs, flow_shapes_root, trainer_tools) -> Path:
    run_dir = flow_runs / "zero2"
    trainer_tools.checked(trainer_tools.flow_engine(flow_shapes_root, run_dir), nproc=2, launcher="deepspeed")
    return run_dir


@pytest.fixture(scope="module")
def zero3(flow_runs, flow_shapes_root, trainer_tools) -> Path:
    run_dir = flow_runs / "zero3"
    ov = trainer_tools.flow_engine(flow_shapes_root, run_dir, "parallel.zero_stage=3", f"train.stages.stage2.steps={SHORT}")
    trainer_tools.checked(ov, nproc=2, launcher="deepspeed")
    return run_dir


@pytest.fixture(scope="module")
def tp2(flow_runs, flow_shapes_root, trainer_tools) -> Path:
    """tp=2 on 2 ranks (dp=1), with the stage-end export."""
    run_dir = flow_runs / "tp2"
    ov = trainer_tools.flow_engine(flow_shapes_root, run_dir, "parallel.tp=2", "checkpoint.export_hf=true", f"train.stages.stage2.steps={SHORT}")
    trainer_tools.checked(ov, nproc=2, launcher="torchrun")
    return run_dir


def _by_step(tools, run_dir: Path) -> dict[int, dict]:
    rows = tools.metrics(run_dir)
    out = {m["step"]: m for m in rows}
    assert len(out) == len(rows), f"{run_dir}: a step logged twice"
    return out


def _assert_matches(ref: dict[int, dict], got: dict[int, dict], steps: int) -> None:
    assert sorted(got) == list(range(1, steps + 1))
    for step, b in got.items():
        a = ref[step]
        assert tuple(a[k] for k in TOKENS) == tuple(b[k] for k in TOKENS), step
        for key in LOSSES:
            assert (a[key] is None) == (b[key] is None), (step, key, a[key], b[key])
            assert a[key] is None or b[key] == pytest.approx(a[key], rel=TOL), (step, key, a[key], b[key])


# ---- 0. what 1 needs of the model: every kind of row runs the same modules in the same order ------


def test_touch_all_runs_one_module_order(flow_shapes_root):
    """With data.granularity=row two ranks may run different tasks in one micro-step. Under ZeRO-3
    each module gathers its parameters when it runs, so an und or text row (its dummy branches)
    must run the modules in the order a gen row does (else the gathers mismatch and the ranks
    hang); under ZeRO-2 the gradient bucket is reduced in the order gradients become ready, so
    that order must match too (else the ranks' buckets are summed misaligned: test 1 then fails
    at ~1e-4 from step 2 on)."""
    from janus_train.checkpoint.io import load_pretrained
    from janus_train.data.loader import build_train_loader

    root = flow_shapes_root
    model = load_pretrained(root / "flow_init").train()
    data = {
        "und": [{"path": str(root / "und")}], "text": [{"path": str(root / "text")}], "gen": [{"path": str(root / "gen_real")}],
        "seq_len": 256, "ratio": [1, 1, 2], "global_batch": 4, "micro_batch_rows": 1, "num_workers": 0,
        "granularity": "row", "tokenizer": str(root / "flow_init"), "cfg_dropout": 0.0,
    }
    with build_train_loader(data, None, model.config, 0, 1) as loader:
        step = next(iter(loader))
    names = {p: n for n, p in model.named_parameters()}
    grads: list[str] = []
    calls: list[str] = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: grads.append(names[p]))
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
    orders = {}
    for mb in step:
        grads.clear()
        calls.clear()
        model.zero_grad(set_to_none=True)
        out = model(mb, touch_all=True)
        sum(out.loss_sum.values()).backward()
        orders.setdefault(mb.meta["row_tasks"][0], (list(calls), list(grads)))
    assert sorted(orders) == ["gen", "text", "und"]
    gen_calls, gen_grads = orders["gen"]
    assert len(gen_grads) == len(names) and "vision" in gen_calls
    for task in ("und", "text"):
        assert orders[task][0] == gen_calls, f"{task} rows run the modules in another order"
        assert orders[task][1] == gen_grads, f"{task} rows ready the gradients in another order"


# ---- 1. the batch split -------------------------------------------------------------------------


def test_reference_is_a_mixed_stage_that_trains(one_rank, flow_shapes_root, trainer_tools):
    ref = _by_step(trainer_tools, one_rank)
    assert sorted(ref) == list(range(1, STEPS + 1))
    for m in ref.values():
        assert m["tokens_und"] > 0 and m["tokens_text"] > 0 and m["tokens_gen"] > 0, m
        assert all(m[k] is not None for k in LOSSES), m
        assert m["loss_gen"] is None  # JanusFlow has no gen CE
        # The logged loss is the sum of the three groups' means (CE over und+text tokens).
        ce = (m["loss_und"] * m["tokens_und"] + m["loss_text"] * m["tokens_text"]) / (m["tokens_und"] + m["tokens_text"])
        assert m["loss"] == pytest.approx(ce + m["loss_flow"] + m["loss_repa"], rel=1e-9)
    for key in LOSSES:  # every loss changes across steps
        assert len({m[key] for m in ref.values()}) > 1, key
    # The model moved: the step-2 weights differ from the init in every trained part.
    from janus_train.checkpoint.io import read_checkpoint

    _, init = read_checkpoint(flow_shapes_root / "flow_init")
    _, step2 = read_checkpoint(one_rank / "checkpoints" / "step_00000002" / "model")
    shared = set(init) & set(step2)
    assert shared and any(k.startswith("repa_proj") for k in step2)
    changed = {k.split(".")[0] for k in shared if not torch.equal(init[k], step2[k])}
    trained = {"llm", "lm_head", "vision", "und_aligner", "und_begin", "gen_encoder", "gen_enc_aligner", "gen_dec_norm", "gen_dec_aligner", "gen_decoder"}
    assert changed == trained, changed


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_match_one_rank_with_accumulation(one_rank, request, trainer_tools, zero):
    ref = _by_step(trainer_tools, one_rank)
    two = _by_step(trainer_tools, request.getfixturevalue(f"zero{zero}"))
    _assert_matches(ref, two, STEPS if zero == 2 else SHORT)
    meta = json.loads((request.getfixturevalue(f"zero{zero}") / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert (meta["world_size"], meta["dp_size"], meta["zero_stage"]) == (2, 2, zero)


# ---- 2. tensor parallelism ------------------------------------------------------------------------


def test_tp2_matches_tp1(one_rank, tp2, trainer_tools):
    _assert_matches(_by_step(trainer_tools, one_rank), _by_step(trainer_tools, tp2), SHORT)
    meta = json.loads((tp2 / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert (meta["tp"], meta["world_size"], meta["dp_size"]) == (2, 2, 1)


# ---- 3. resume ------------------------------------------------------------------------------------


def test_resume_from_step2_is_bitwise(one_rank, flow_shapes_root, tmp_path, trainer_tools):
    """A copy of the reference run cut back to its step-2 checkpoint, resumed: steps 3-4 log
    exactly what the uninterrupted run logged."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(one_rank, run_dir)
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > 2:
            shutil.rmtree(ckpt)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(line for line in lines if line.strip() and json.loads(line)["step"] <= 2))
    r = trainer_tools.checked(trainer_tools.flow_engine(flow_shapes_root, run_dir, "resume=auto"))
    assert "resuming from" in r.stdout + r.stderr and "step_00000002" in r.stdout + r.stderr
    ref, resumed = trainer_tools.metrics(one_rank), trainer_tools.metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    keys = (*LOSSES, "loss_gen", *TOKENS, "grad_norm", "lr", "stage_step", "skipped_steps")
    for a, b in zip(ref, resumed):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]  # bit for bit


# ---- 4. the stage-end export ------------------------------------------------------------------------


def test_stage_end_export_is_a_janusflow_release(tp2):
    from janus_train.checkpoint.io import detect_format, load_pretrained, read_checkpoint
    from janus_train.models.janusflow.model import JanusFlowModel

    export = tp2 / "exports" / "stage2"
    d = json.loads((export / "config.json").read_text())
    assert {"language_config", "vision_und_enc_config", "vision_gen_enc_config", "vision_gen_dec_config"} <= set(d)
    assert detect_format(export) == "deepseek" and (export / "tokenizer.json").is_file()
    model = load_pretrained(export)  # strict load
    assert isinstance(model, JanusFlowModel)
    # The export holds the last checkpoint's weights (whole, gathered over the TP ranks), less
    # the training-only REPA projector.
    last = max((tp2 / "checkpoints").glob("step_*"))
    assert last.name == f"step_{SHORT:08d}"
    _, trained = read_checkpoint(last / "model")
    _, exported = read_checkpoint(export)
    assert not any(k.startswith("repa_proj") for k in exported)
    assert set(exported) == {k for k in trained if not k.startswith("repa_proj")}
    assert all(torch.equal(exported[k], trained[k]) for k in exported)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], exported[k]) for k in exported)



def test_stage1_trains_only_the_new_parts(flow_shapes_root, tmp_path, trainer_tools):
    """The recipe's stage-1 freeze rule in a real run: the LLM, lm_head and SigLIP keep the init's
    weights bit for bit; every new part moves."""
    from janus_train.checkpoint.io import read_checkpoint
    from janus_train.models.families import JANUSFLOW

    run_dir = tmp_path / "stage1"
    ov = [o for o in trainer_tools.flow_engine(flow_shapes_root, run_dir) if not o.startswith(("train.stages.stage1.enabled", "train.stages.stage2."))]
    ov += ["train.stages.stage2.enabled=false", "train.stages.stage1.steps=2", "train.stages.stage1.global_batch=4", "train.stages.stage1.ratio=1:0:1"]
    trainer_tools.checked(ov)
    _, init = read_checkpoint(flow_shapes_root / "flow_init")
    _, after = read_checkpoint(run_dir / "checkpoints" / "step_00000002" / "model")
    trained = set(JANUSFLOW.components) - {"llm", "lm_head", "vision"}
    for comp in JANUSFLOW.components:
        keys = [k for k in init if k == comp or k.startswith(comp + ".")]
        if comp == "repa_proj":
            assert not keys and any(k.startswith("repa_proj.") for k in after)  # not in the release: fresh, then trained
            continue
        assert keys, comp
        moved = any(not torch.equal(init[k], after[k]) for k in keys)
        assert moved == (comp in trained), comp
