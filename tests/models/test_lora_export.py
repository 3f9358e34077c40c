"""Issue 14 item 1, the export side of LoRA: a LoRA run's checkpoint (peft adapters on our module
names + base.json) merges into whole weights by peft, and exports as a peft adapter directory
that real clients (transformers' JanusForConditionalGeneration + peft) load with the same logits."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from janus_train.checkpoint.io import CheckpointError, copy_aux_files, load_pretrained, load_tokenizer, read_checkpoint
from janus_train.checkpoint.manager import CheckpointMeta
from janus_train.convert import convert, main

from .test_parity_hf import check_model_parity

R, ALPHA = 4, 8
TARGETS = (
    r"llm\.layers\.\d+\.(attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    r"|vision\.blocks\.\d+\.attn\.(q|k|v)_proj|und_aligner\.layers\.\d+|gen_head\.fc1"
)
SAVED = ["gen_aligner"]  # trained whole (peft's modules_to_save)


def write_lora_checkpoint(run, base, base_format, seed=0, targets=TARGETS, saved=SAVED):
    """What a finetune.mode=lora run writes: peft's save_pretrained of our model wrapped with
    LoRA (non-zero lora_B, a changed modules_to_save copy) + base.json + tokenizer + meta.json.
    Returns the peft-wrapped model (fp32)."""
    from peft import LoraConfig, get_peft_model

    model = load_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, modules_to_save=saved))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = run / "checkpoints" / "step_00000010"
    model_dir = ckpt / "model"
    peft_model.save_pretrained(str(model_dir))
    (model_dir / "base.json").write_text(json.dumps({"path": str(base), "format": base_format}))
    copy_aux_files(base, model_dir)
    meta = CheckpointMeta(step=10, stage=3, stage_step=10, stage_steps=10, world_size=1, dp_size=1, tp=1, zero_stage=0)
    (ckpt / "meta.json").write_text(json.dumps(dataclasses.asdict(meta)))
    return peft_model.eval()


@pytest.fixture(scope="module")
def lora(tiny_native_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    run = root / "run"
    peft_model = write_lora_checkpoint(run, tiny_native_ckpt, "native")
    hf_base = convert(tiny_native_ckpt, "native", root / "base_hf", "hf")
    return {"root": root, "run": run, "peft": peft_model, "hf_base": hf_base, "base": tiny_native_ckpt}


def test_merged_weights_equal_base_plus_peft_merge(lora, tmp_path):
    out = convert(lora["run"], "train", tmp_path / "merged", "native")
    _, merged = read_checkpoint(out, "native")
    _, base = read_checkpoint(lora["base"], "native")
    expected = copy.deepcopy(lora["peft"]).merge_and_unload().state_dict()
    assert merged.keys() == base.keys()
    changed = 0
    for k, v in merged.items():
        assert (v - expected[k]).abs().max().item() <= 1e-6, k
        changed += not torch.equal(v, base[k])
    # Every adapted module changed (7 LLM linears x 2 layers, 3 SigLIP x 2 blocks, 2 und_aligner
    # linears x (weight) , gen_head.fc1) and the trained gen_aligner copy (2 linears x 2 tensors).
    assert changed >= 14 + 6 + 2 + 1 + 4
    # The same as W + alpha/r * B @ A, from the adapter file (independent of peft's merge).
    ad = load_file(str(lora["run"] / "checkpoints/step_00000010/model/adapter_model.safetensors"))
    a = ad["base_model.model.llm.layers.1.attn.q_proj.lora_A.weight"]
    b = ad["base_model.model.llm.layers.1.attn.q_proj.lora_B.weight"]
    k = "llm.layers.1.attn.q_proj.weight"
    assert (merged[k] - (base[k] + ALPHA / R * b @ a)).abs().max().item() <= 1e-6
    assert torch.equal(merged["gen_aligner.layers.0.weight"], ad["base_model.model.gen_aligner.layers.0.weight"])


def test_peft_export_loads_onto_transformers_with_the_same_logits(lora, tmp_path, docs):
    from peft import PeftModel
    from transformers import JanusForConditionalGeneration

    adapter = convert(lora["run"], "train", tmp_path / "adapter", "peft", base=str(lora["hf_base"]))
    merged_hf = convert(lora["run"], "train", tmp_path / "merged_hf", "hf")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(lora["hf_base"])
    assert "model.language_model.layers.0.self_attn.q_proj" in cfg["target_modules"]
    assert "model.vision_model.encoder.layers.1.self_attn.v_proj" in cfg["target_modules"]
    assert "model.aligner.hidden_layers.0" in cfg["target_modules"] and "model.generation_head.proj_out" in cfg["target_modules"]
    assert len(cfg["target_modules"]) == 14 + 6 + 2 + 1
    assert cfg["modules_to_save"] == ["model.generation_aligner"] and (cfg["r"], cfg["lora_alpha"]) == (R, ALPHA)
    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert not any(".llm." in k or "gen_head" in k for k in keys)

    hf_base = JanusForConditionalGeneration.from_pretrained(str(lora["hf_base"]), dtype=torch.float32)
    hf_peft = PeftModel.from_pretrained(hf_base, str(adapter)).eval()
    hf_merged = JanusForConditionalGeneration.from_pretrained(str(merged_hf), dtype=torch.float32).eval()
    tok = load_tokenizer(lora["hf_base"])
    # transformers + peft == our model with the adapter, and == transformers on our merged export
    # (und text logits and gen head logits, within 1e-4; check_model_parity asserts both).
    # (get_base_model(): transformers' model with peft's LoRA layers injected, as loaded.)
    check_model_parity(lora["peft"], hf_peft.get_base_model(), tok, docs)
    check_model_parity(load_pretrained(merged_hf), hf_peft.get_base_model(), tok, docs)
    ids = torch.tensor([[1, 5, 9, 13, 40, 41, 42]])
    with torch.no_grad():
        a = hf_peft(input_ids=ids).logits
        b = hf_merged(input_ids=ids).logits
        with hf_peft.disable_adapter():
            plain = hf_peft(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - plain).abs().max().item() > 1e-2, "the adapter must change the logits, or the test proves nothing"


def test_peft_export_defaults_to_an_hf_base_and_checks_base(lora, tmp_path):
    run = tmp_path / "run_hf"
    write_lora_checkpoint(run, lora["hf_base"], "auto", seed=1)
    out = convert(run, "train", tmp_path / "adapter", "peft")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(lora["hf_base"])
    # The run's base is native: transformers needs an hf one, and says how to make it.
    with pytest.raises(CheckpointError, match="--dst-format hf, then pass --base"):
        convert(lora["run"], "train", tmp_path / "a2", "peft")
    # --base of another model is refused.
    other = convert(lora["base"], "native", tmp_path / "other", "hf")
    cfgf = other / "config.json"
    d = json.loads(cfgf.read_text())
    d["text_config"]["intermediate_size"] += 8
    cfgf.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="--base .*different model"):
        convert(lora["run"], "train", tmp_path / "a3", "peft", base=str(other))


def _copy_run(lora, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora["run"], run)
    return run, run / "checkpoints/step_00000010/model"


def test_missing_base_names_the_path(lora, tmp_path, capsys):
    run, model_dir = _copy_run(lora, tmp_path)
    (model_dir / "base.json").write_text(json.dumps({"path": str(tmp_path / "gone"), "format": "native"}))
    assert main(["--src", str(run), "--src-format", "train", "--dst", str(tmp_path / "o"), "--dst-format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "gone") in err and "base.json" in err
    (model_dir / "base.json").unlink()
    with pytest.raises(CheckpointError, match="base.json: missing"):
        convert(run, "train", tmp_path / "o", "native")


def test_adapter_for_another_model_names_the_key(lora, tmp_path, capsys):
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    run, model_dir = _copy_run(lora, tmp_path)
    other = make_tiny_checkpoint(tmp_path / "wider", fmt="native", overrides={"llm.intermediate_size": 96})
    (model_dir / "base.json").write_text(json.dumps({"path": str(other), "format": "native"}))
    for dst in ("native", "peft"):
        assert main(["--src", str(run), "--src-format", "train", "--dst", str(tmp_path / dst), "--dst-format", dst,
                     "--base", str(other)] if dst == "peft" else
                    ["--src", str(run), "--src-format", "train", "--dst", str(tmp_path / dst), "--dst-format", dst]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "adapter for another model" in err and "mlp" in err, err
        assert not (tmp_path / dst).exists()


def test_incomplete_adapter_names_the_missing_tensor(lora, tmp_path):
    from safetensors.torch import save_file

    run, model_dir = _copy_run(lora, tmp_path)
    w = load_file(str(model_dir / "adapter_model.safetensors"))
    del w["base_model.model.llm.layers.0.attn.q_proj.lora_A.weight"]
    save_file(w, str(model_dir / "adapter_model.safetensors"))
    for dst in ("native", "peft"):
        with pytest.raises(CheckpointError, match=r"missing 1 adapter tensor.*llm\.layers\.0\.attn\.q_proj\.lora_A"):
            convert(run, "train", tmp_path / dst, dst, base=str(lora["hf_base"]) if dst == "peft" else None)


def test_peft_export_needs_a_lora_train_checkpoint(lora, tmp_path, tiny_native_ckpt):
    with pytest.raises(CheckpointError, match="--src-format train"):
        convert(tiny_native_ckpt, "native", tmp_path / "a", "peft")
    # A full fine-tune's checkpoint: whole weights, no adapters.
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000010"
    shutil.copytree(tiny_native_ckpt, ckpt / "model")
    shutil.copy(lora["run"] / "checkpoints/step_00000010/meta.json", ckpt / "meta.json")
    with pytest.raises(CheckpointError, match="no adapter_config.json.*finetune.mode=lora"):
        convert(tmp_path / "full", "train", tmp_path / "b", "peft")
    with pytest.raises(CheckpointError, match="only used with --dst-format peft"):
        convert(tmp_path / "full", "train", tmp_path / "c", "hf", base="x")


def test_bf16_base_merges_in_fp32_and_keeps_its_dtype(lora, tmp_path):
    base16 = convert(lora["base"], "native", tmp_path / "base16", "native", dtype="bf16")
    run = tmp_path / "run16"
    peft_model = write_lora_checkpoint(run, base16, "native", seed=2)
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()  # fp32 (the base upcast)
    _, keep = read_checkpoint(convert(run, "train", tmp_path / "keep", "native"), "native")
    _, full = read_checkpoint(convert(run, "train", tmp_path / "fp32", "native", dtype="fp32"), "native")
    for k in keep:
        assert keep[k].dtype == torch.bfloat16 and torch.equal(keep[k], expected[k].to(torch.bfloat16)), k  # rounded once
        assert full[k].dtype == torch.float32 and torch.equal(full[k], expected[k]), k


def test_janusflow_adapters_merge_and_peft_export_is_refused(tmp_path):
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    flow = make_tiny_checkpoint(tmp_path / "flow", fmt="native", family="janusflow", preset="janusflow_tiny")
    run = tmp_path / "run"
    peft_model = write_lora_checkpoint(run, flow, "native", targets=r"llm\.layers\.\d+\.attn\.(q|v)_proj", saved=["gen_dec_aligner"])
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    _, merged = read_checkpoint(convert(run, "train", tmp_path / "merged", "native"), "native")
    assert merged.keys() and all(torch.equal(v, expected[k]) for k, v in merged.items())
    with pytest.raises(CheckpointError, match="JanusFlow has no transformers model class"):
        convert(run, "train", tmp_path / "a", "peft")


def test_the_trainers_own_adapter_files_export(lora, tmp_path):
    """The checkpoint writer of the training side (models/lora.py: apply_lora, adapter_state_dict,
    write_adapter; modules to save trained in place, not wrapped) gives files this export reads."""
    from janus_train.models.janus.model import JanusModel
    from janus_train.models.lora import LoraSettings, adapter_state_dict, apply_lora, write_adapter

    settings = LoraSettings(rank=R, alpha=ALPHA, dropout=0.0, target_modules=("llm_attn", "llm_mlp", "vision"), modules_to_save=("gen_head",))
    model = apply_lora(load_pretrained(lora["base"], dtype=torch.float32), settings)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_A" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    write_adapter(ckpt / "model", settings, adapter_state_dict(trainable, settings), JanusModel)
    (ckpt / "model" / "base.json").write_text(json.dumps({"path": str(lora["hf_base"]), "format": "hf"}))
    shutil.copy(lora["run"] / "checkpoints/step_00000010/meta.json", ckpt / "meta.json")
    _, merged = read_checkpoint(convert(tmp_path / "run", "train", tmp_path / "merged", "native"), "native")
    _, base = read_checkpoint(lora["base"], "native")
    q = "llm.layers.0.attn.q_proj"
    delta = ALPHA / R * trainable[f"{q}.lora_B.default.weight"] @ trainable[f"{q}.lora_A.default.weight"]
    assert (merged[f"{q}.weight"] - (base[f"{q}.weight"] + delta)).abs().max().item() <= 1e-6
    assert torch.equal(merged["gen_head.fc2.weight"], trainable["gen_head.fc2.weight"])
    adapter = convert(tmp_path / "run", "train", tmp_path / "adapter", "peft")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["model.generation_head"] and "model.vision_model.encoder.layers.0.mlp.fc2" in cfg["target_modules"]


def test_help_lists_peft(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "peft" in out and "--base" in out
