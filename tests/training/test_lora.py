"""LoRA fine-tuning (finetune.mode=lora) with peft: what trains, what is saved, what is exported.

Fast tests work on the tiny model in process (peft's file format, freezing, recomputation,
merging, config errors); the slow ones train through launch/train.py on the session's shapes
data: ZeRO-0/2/3 agree, a checkpoint holds only the adapters and resumes bit for bit, and the
stage export holds the merged whole weights.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from janus_train.contracts.synthetic import mixed_batch
from janus_train.models.janus.config import JanusConfig
from janus_train.models.janus.model import JanusModel
from janus_train.models.lora import (LoraSettings, adapter_state_dict, apply_lora, load_adapter_state, read_adapter,
                                     write_adapter)
from janus_train.training.config import ConfigError, load_config, validate_config

SETTINGS = LoraSettings(rank=4, alpha=8, dropout=0.1, target_modules=("llm_attn", "llm_mlp", "und_aligner"), modules_to_save=("gen_head",))


def _base() -> JanusModel:
    torch.manual_seed(0)
    model = JanusModel(JanusConfig.from_preset("tiny"))
    model.init_weights(std=0.05, seed=0)
    return model.train()


def _trained_adapters(model: JanusModel) -> JanusModel:
    """An injected copy whose adapters and gen_head hold non-trivial values (lora_B starts at 0)."""
    m = apply_lora(copy.deepcopy(model), SETTINGS)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in m.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return m


def _trainable_sd(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- fast: in process ----------------------------------------------------------------------


def test_only_adapters_and_modules_to_save_train():
    base = _base()
    model = apply_lora(copy.deepcopy(base), SETTINGS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n or n.startswith("gen_head.") for n in trainable)
    assert any(n.startswith("und_aligner.") for n in trainable) and any(".mlp.down_proj." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, _ = mixed_batch(model.config, 128, 10, seed=5)
    losses = []
    for _ in range(3):
        out = model(batch)
        loss = out.total_sum() / sum(out.num_tokens.values())
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n  # lora_A, lora_B and gen_head all moved
        else:
            assert torch.equal(p, before[n]), n  # the base, bitwise


@pytest.mark.parametrize("mode,every", [("full", 1), ("selective", 2), ("selective", 1)])
def test_recompute_gives_identical_gradients_with_adapters(mode, every):
    # LoRA dropout draws from torch's RNG: recomputation must replay the same masks.
    model = _trained_adapters(_base())
    batch, _ = mixed_batch(model.config, 128, 10, seed=5)

    def grads(m):
        torch.manual_seed(7)
        out = m(batch)
        (out.total_sum() / sum(out.num_tokens.values())).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads(copy.deepcopy(model))
    m = copy.deepcopy(model)
    m.apply_recompute(mode, every)
    got = grads(m)
    assert got.keys() == ref.keys() and any(".lora_A." in n for n in got)
    for name, g in ref.items():
        assert torch.equal(got[name], g), name


def test_adapter_files_are_peft_save_pretrained(tmp_path):
    """Our writer gives what PeftModel.save_pretrained writes for the same model and values
    (keys, tensors, adapter_config.json), and peft loads them back."""
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    from janus_train.models.lora import lora_config

    base = _base()
    ours = _trained_adapters(base)
    adapter = adapter_state_dict(_trainable_sd(ours), SETTINGS)
    write_adapter(tmp_path / "ours", SETTINGS, adapter, JanusModel)

    peft_model = get_peft_model(copy.deepcopy(base), lora_config(SETTINGS))
    result = set_peft_model_state_dict(peft_model, load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    peft_model.save_pretrained(str(tmp_path / "peft"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    assert "base_model.model.llm.layers.0.attn.q_proj.lora_A.weight" in mine and "base_model.model.gen_head.fc1.weight" in mine
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())

    # peft's loader on a fresh base gives the same function as our injected model
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    batch, _ = mixed_batch(base.config, 128, 10, seed=5)
    with torch.no_grad():
        a, b = loaded(batch), copy.deepcopy(ours).eval()(batch)
    for name in a.loss_sum:
        assert torch.equal(a.loss_sum[name], b.loss_sum[name]), name

    # and our reader round-trips
    settings, sd = read_adapter(tmp_path / "ours")
    again = apply_lora(copy.deepcopy(base), settings)
    load_adapter_state(again, sd)
    for n, p in again.named_parameters():
        assert torch.equal(p, dict(ours.named_parameters())[n]), n


def test_merge_is_base_plus_scaled_product(tmp_path):
    """The adapter files as a LoRA checkpoint writes them, merged by the one reader every tool
    uses (checkpoint/adapters.py: peft's merge_and_unload)."""
    import json

    from janus_train.checkpoint.adapters import read_lora_checkpoint
    from janus_train.checkpoint.io import write_checkpoint

    base = _base()
    ours = _trained_adapters(base)
    adapter = adapter_state_dict(_trainable_sd(ours), SETTINGS)
    write_checkpoint(tmp_path / "base", base.config, base.state_dict(), fmt="native")
    write_adapter(tmp_path / "model", SETTINGS, adapter, JanusModel)
    (tmp_path / "model" / "base.json").write_text(json.dumps({"path": str(tmp_path / "base"), "format": "native"}))
    _, merged = read_lora_checkpoint(tmp_path / "model", dtype=torch.float32)
    base_sd = base.state_dict()
    assert merged.keys() == base_sd.keys()
    params = dict(ours.named_parameters())
    adapted = {n.removesuffix(".lora_A.default.weight") for n in params if n.endswith(".lora_A.default.weight")}
    scale = SETTINGS.alpha / SETTINGS.rank
    for key, value in merged.items():
        module = key.removesuffix(".weight")
        if module in adapted and key.endswith(".weight"):
            want = base_sd[key] + params[f"{module}.lora_B.default.weight"] @ params[f"{module}.lora_A.default.weight"] * scale
            assert torch.allclose(value, want, atol=1e-6, rtol=0), key
        elif key.startswith("gen_head."):
            assert torch.equal(value, params[key]), key
        else:
            assert torch.equal(value, base_sd[key]), key


def test_janusflow_takes_adapters():
    from janus_train.models.families import JANUSFLOW
    from janus_train.models.janusflow.config import JanusFlowConfig
    from janus_train.models.janusflow.model import JanusFlowModel
    from janus_train.models.lora import check_targets

    cfg = JanusFlowConfig.from_preset("janusflow_tiny")
    torch.manual_seed(0)
    settings = LoraSettings(4, 8, 0.0, ("llm_attn", "gen_aligner", "vision"), ("und_aligner",))
    model = JanusFlowModel(cfg)
    check_targets(model, settings, JANUSFLOW.components, JANUSFLOW.always_frozen)
    apply_lora(model, settings)
    out = model(mixed_batch(cfg, 128, 8, seed=1)[0])
    sum(out.loss_sum.values()).backward()
    graded = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert graded == {"llm", "vision", "und_aligner", "gen_enc_aligner", "gen_dec_aligner"}
    assert all(".lora_" in n or n.startswith("und_aligner.") for n, p in model.named_parameters() if p.grad is not None)


LORA = ["finetune.mode=lora", "model.init_from=/tmp"]


@pytest.mark.parametrize(
    "overrides,key,value",
    [
        (["finetune.lora.rank=0"], "finetune.lora.rank", "0"),
        (["finetune.lora.dropout=1.5"], "finetune.lora.dropout", "1.5"),
        (["finetune.lora.target_modules=[llm_attn,'llm\\.layers\\.\\d+\\.nothing']"], "finetune.lora.target_modules", "nothing"),
        (["finetune.lora.target_modules=[llm]"], "finetune.lora.target_modules", "LanguageModel"),
        (["finetune.lora.target_modules=['vq\\.quant_conv']"], "finetune.lora.target_modules", "never trains"),
        (["finetune.lora.modules_to_save=[vq]"], "finetune.lora.modules_to_save", "vq"),
        (["finetune.lora.target_modules=[gen_head]", "finetune.lora.modules_to_save=[gen_head]"], "finetune.lora.target_modules", "gen_head"),
        (["parallel.tp=2"], "parallel.tp", "tp=1 only"),
        (["finetune.mode=qlora"], "finetune.mode", "qlora"),
    ],
)
def test_bad_lora_settings_name_key_and_value(overrides, key, value):
    cfg = load_config(["+recipe=tiny_demo", "demo_assets.build=false", *LORA, *overrides])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, check_paths=False)
    assert e.value.key == key and value in e.value.message, str(e.value)


def test_lora_needs_a_base():
    cfg = load_config(["+recipe=tiny_demo", "demo_assets.build=false", "finetune.mode=lora", "model.init_from=null"])
    with pytest.raises(ConfigError, match="model.init_from"):
        validate_config(cfg, check_paths=False)


# ---- slow: training through launch/train.py -------------------------------------------------

STEPS = 4
ENGINE = ["finetune.mode=lora", "finetune.lora.modules_to_save=[gen_head]", f"train.stages.stage2.steps={STEPS}"]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "processor_config.json",
                   "special_tokens_map.json", "preprocessor_config.json"}


def _losses(tools, run_dir):
    return [(m["step"], m["loss"], m["loss_und"], m["loss_text"], m["loss_gen"], m["grad_norm"]) for m in tools.metrics(run_dir)]


@pytest.fixture(scope="module")
def lora_run(shapes_root, tmp_path_factory, trainer_tools) -> Path:
    """4 LoRA steps, ZeRO-2, one rank, stage export on."""
    run_dir = tmp_path_factory.mktemp("lora") / "zero2"
    trainer_tools.checked(trainer_tools.engine(shapes_root, run_dir, *ENGINE, "checkpoint.export_hf=true"))
    return run_dir


@pytest.mark.slow
def test_lora_run_loss_falls_and_checkpoint_holds_only_adapters(lora_run, shapes_root, trainer_tools):
    losses = [m["loss"] for m in trainer_tools.metrics(lora_run)]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    for ckpt in sorted((lora_run / "checkpoints").glob("step_*")):
        model = ckpt / "model"
        names = {p.name for p in model.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "base.json"} <= names
        assert names - {"adapter_config.json", "adapter_model.safetensors", "base.json"} <= TOKENIZER_FILES, names
        assert json.loads((model / "base.json").read_text()) == {"path": str((shapes_root / "tiny_init").resolve()), "format": "hf"}
        keys = set(load_file(str(model / "adapter_model.safetensors")))
        assert keys and all(k.startswith("base_model.model.") for k in keys)
        assert all(".lora_A.weight" in k or ".lora_B.weight" in k or k.startswith("base_model.model.gen_head.") for k in keys)
        # DeepSpeed's part holds no frozen weights either
        for f in (ckpt / "ds").glob("*model_states.pt"):
            state = torch.load(f, weights_only=False, map_location="cpu")
            assert all(".lora_" in k or k.startswith("gen_head.") for k in state["module"]), sorted(state["module"])[:5]
            assert not state.get("frozen_param_fragments")
        base_bytes = sum(f.stat().st_size for f in (shapes_root / "tiny_init").glob("*.safetensors"))
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".pt"))
        assert ckpt_bytes < base_bytes / 2, (ckpt_bytes, base_bytes)


@pytest.mark.slow
def test_lora_export_is_merged_whole_weights(lora_run, shapes_root):
    from janus_train.checkpoint.io import read_checkpoint

    _, exported = read_checkpoint(lora_run / "exports" / "stage2")
    _, base = read_checkpoint(shapes_root / "tiny_init")
    settings, adapter = read_adapter(lora_run / "checkpoints" / f"step_{STEPS:08d}" / "model")
    assert exported.keys() == base.keys()
    scale = settings.alpha / settings.rank
    adapted = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in adapter if k.endswith(".lora_A.weight")}
    changed = 0
    for key, value in exported.items():
        module = key.removesuffix(".weight")
        if module in adapted and key.endswith(".weight"):
            a, b = adapter[f"base_model.model.{module}.lora_A.weight"], adapter[f"base_model.model.{module}.lora_B.weight"]
            assert torch.allclose(value, base[key] + b @ a * scale, atol=1e-6, rtol=0), key
            changed += not torch.equal(value, base[key])
        elif key.startswith("gen_head."):
            assert torch.equal(value, adapter[f"base_model.model.{key}"]), key
        else:
            assert torch.equal(value, base[key]), key  # not adapted: the base, bitwise
    assert changed  # the adapters learned something


@pytest.mark.slow
@pytest.mark.parametrize("variant", [("parallel.zero_stage=0", "model.recompute=full"), ("parallel.zero_stage=3",)], ids=["zero0_recompute", "zero3"])
def test_zero_stages_and_recompute_give_equal_losses(variant, lora_run, shapes_root, tmp_path, trainer_tools):
    run_dir = tmp_path / "run"
    trainer_tools.checked(trainer_tools.engine(shapes_root, run_dir, *ENGINE, *variant))
    ref, got = _losses(trainer_tools, lora_run), _losses(trainer_tools, run_dir)
    assert [x[0] for x in got] == [x[0] for x in ref]
    for r, g in zip(ref, got):
        for a, b in zip(r[1:-1], g[1:-1]):  # the losses
            assert (a is None and b is None) or abs(a - b) <= 1e-5, (r, g)
        if g[-1] is not None:  # the grad norm (DeepSpeed's ZeRO-0 engine reports none)
            assert abs(r[-1] - g[-1]) <= 1e-5, (r, g)
    last = f"step_{STEPS:08d}"
    mine = load_file(str(run_dir / "checkpoints" / last / "model" / "adapter_model.safetensors"))
    theirs = load_file(str(lora_run / "checkpoints" / last / "model" / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.allclose(mine[k], theirs[k], atol=1e-5, rtol=0), k
    if "parallel.zero_stage=3" in variant:  # ZeRO-3's partitioned state resumes bit for bit too
        again = tmp_path / "resumed"
        _resumes_bitwise(run_dir, again, trainer_tools.engine(shapes_root, again, *ENGINE, *variant), trainer_tools)


def _resumes_bitwise(src: Path, run_dir: Path, overrides: list[str], tools) -> None:
    """Cut a copy of the finished run `src` back to its step-2 checkpoint and resume it: the same
    losses and grad norms and the same final adapters, bit for bit."""
    shutil.copytree(src, run_dir)
    for p in [run_dir / "exports", *(run_dir / "checkpoints").glob("step_*")]:
        if p.exists() and p.name != "step_00000002":
            shutil.rmtree(p)
    (run_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    r = tools.checked([*overrides, "resume=auto"])
    assert "resuming from" in r.stdout + r.stderr
    assert _losses(tools, run_dir) == _losses(tools, src)
    last = f"step_{STEPS:08d}"
    mine = load_file(str(run_dir / "checkpoints" / last / "model" / "adapter_model.safetensors"))
    theirs = load_file(str(src / "checkpoints" / last / "model" / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.slow
def test_lora_resume_is_bitwise(lora_run, shapes_root, tmp_path, trainer_tools):
    run_dir = tmp_path / "run"
    _resumes_bitwise(lora_run, run_dir, trainer_tools.engine(shapes_root, run_dir, *ENGINE, "checkpoint.export_hf=true"), trainer_tools)


@pytest.mark.slow
def test_next_stage_continues_the_adapters(shapes_root, tmp_path, trainer_tools):
    """Stage 3 of a LoRA run starts from base + stage 2's adapters (and modules to save), not
    from fresh ones: with a negligible stage-3 lr its adapters stay stage 2's."""
    run_dir = tmp_path / "run"
    lora = [o for o in ENGINE if not o.startswith("train.stages.stage2.steps=")]
    trainer_tools.checked(trainer_tools.engine(shapes_root, run_dir, *lora, "train.stages.stage2.steps=2", "train.stages.stage3.enabled=true",
                                               "train.stages.stage3.steps=1", "train.stages.stage3.lr=1e-12"))
    assert [(m["stage"], m["stage_step"]) for m in trainer_tools.metrics(run_dir)] == [(2, 1), (2, 2), (3, 1)]
    two = load_file(str(run_dir / "checkpoints" / "step_00000002" / "model" / "adapter_model.safetensors"))
    three = load_file(str(run_dir / "checkpoints" / "step_00000003" / "model" / "adapter_model.safetensors"))
    assert two.keys() == three.keys()
    assert any(k.endswith(".lora_B.weight") and bool(v.abs().sum() > 0) for k, v in two.items())  # stage 2 trained them
    for k in two:
        assert torch.allclose(three[k], two[k], atol=1e-9, rtol=0), k


@pytest.mark.slow
def test_two_ranks_zero3_under_deepspeed_equal_one_rank(shapes_root, tmp_path, trainer_tools):
    """2 ranks (the deepspeed launcher, ZeRO-3: adapters and base partitioned) = 1 rank ZeRO-2.
    Without dropout: its masks depend on which rank draws them."""
    runs = {}
    for name, nproc, launcher, zero in (("one", 1, "python", 2), ("two", 2, "deepspeed", 3)):
        runs[name] = tmp_path / name
        trainer_tools.checked(trainer_tools.engine(shapes_root, runs[name], *ENGINE, "finetune.lora.dropout=0.0", f"parallel.zero_stage={zero}"),
                              nproc=nproc, launcher=launcher)
    ref, got = _losses(trainer_tools, runs["one"]), _losses(trainer_tools, runs["two"])
    assert [x[0] for x in got] == [x[0] for x in ref] == list(range(1, STEPS + 1))
    for r, g in zip(ref, got):
        for a, b in zip(r[1:], g[1:]):
            assert (a is None and b is None) or abs(a - b) <= 1e-5, (r, g)
    last = f"step_{STEPS:08d}"
    one = load_file(str(runs["one"] / "checkpoints" / last / "model" / "adapter_model.safetensors"))
    two = load_file(str(runs["two"] / "checkpoints" / last / "model" / "adapter_model.safetensors"))
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-5, rtol=0) for k in one)
