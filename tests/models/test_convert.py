"""Acceptance 2 and 6: bitwise round trips, carried tokenizer files, and loud failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from janus_train.convert import convert
from janus_train.checkpoint.io import CheckpointError, load_pretrained, read_checkpoint


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_hf_native_hf_is_bitwise(tiny_hf_ckpt, tmp_path):
    native = convert(tiny_hf_ckpt, "hf", tmp_path / "native", "native")
    back = convert(native, "native", tmp_path / "hf2", "hf")
    _assert_bitwise_equal(_tensors(tiny_hf_ckpt), _tensors(back))
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (tiny_hf_ckpt / name).read_bytes(), name


def test_bf16_round_trip_keeps_dtype(tiny_hf_ckpt, tmp_path):
    bf = convert(tiny_hf_ckpt, "hf", tmp_path / "bf16", "hf", dtype="bf16")
    native = convert(bf, "hf", tmp_path / "native", "native")
    back = convert(native, "native", tmp_path / "back", "hf")
    t = _tensors(back)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    _assert_bitwise_equal(_tensors(bf), t)


def test_deepseek_native_matches_hf_weights(tiny_ckpt_root, tmp_path):
    ds_native = convert(tiny_ckpt_root / "deepseek", "deepseek", tmp_path / "a", "native")
    hf_native = convert(tiny_ckpt_root / "hf", "hf", tmp_path / "b", "native")
    _assert_bitwise_equal(_tensors(ds_native), _tensors(hf_native))
    # DeepSeek fuses q/k/v: the split must land on the right projections.
    ds = torch.load(tiny_ckpt_root / "deepseek" / "pytorch_model.bin", weights_only=True)
    qkv = ds["vision_model.vision_tower.blocks.0.attn.qkv.weight"]
    assert torch.equal(_tensors(ds_native)["vision.blocks.0.attn.k_proj.weight"], qkv.chunk(3)[1])


def test_hf_export_loads_in_transformers(tiny_native_ckpt, tmp_path):
    from transformers import JanusForConditionalGeneration

    out = convert(tiny_native_ckpt, "native", tmp_path / "hf", "hf")
    hf = JanusForConditionalGeneration.from_pretrained(str(out))
    ours = load_pretrained(tiny_native_ckpt)
    assert torch.equal(hf.lm_head.weight, ours.lm_head.weight)


def test_missing_tensor_names_the_key(tiny_hf_ckpt, tmp_path):
    bad = convert(tiny_hf_ckpt, "hf", tmp_path / "bad", "hf")
    t = _tensors(bad)
    del t["model.generation_head.vision_head.weight"]
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.generation_head.vision_head.weight"):
        read_checkpoint(bad)


def test_misshaped_tensor_names_key_and_both_shapes(tiny_hf_ckpt, tmp_path):
    bad = convert(tiny_hf_ckpt, "hf", tmp_path / "bad", "hf")
    t = _tensors(bad)
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    t[key] = torch.zeros(7, 3)
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(bad)
    msg = str(e.value)
    assert key in msg and "(7, 3)" in msg and "(172, 64)" in msg


def test_unexpected_tensor_is_an_error(tiny_hf_ckpt, tmp_path):
    bad = convert(tiny_hf_ckpt, "hf", tmp_path / "bad", "hf")
    t = _tensors(bad)
    t["model.extra.weight"] = torch.zeros(2)
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        read_checkpoint(bad)


def test_wrong_and_unknown_formats(tiny_hf_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="format"):
        convert(tiny_hf_ckpt, "gguf", tmp_path / "x", "native")
    with pytest.raises(CheckpointError, match="native"):
        convert(tiny_hf_ckpt, "native", tmp_path / "x", "native")
    with pytest.raises(CheckpointError, match="dst-format"):
        convert(tiny_hf_ckpt, "hf", tmp_path / "x", "deepseek")
    assert not (tmp_path / "x").exists()


def test_failed_conversion_leaves_no_destination(tiny_hf_ckpt, tmp_path):
    bad = convert(tiny_hf_ckpt, "hf", tmp_path / "bad", "hf")
    t = _tensors(bad)
    del t["lm_head.weight"]
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError):
        convert(bad, "hf", tmp_path / "out", "native")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_cli_reports_error_and_exit_code(tiny_hf_ckpt, tmp_path):
    cfg = json.loads((tiny_hf_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "janus"
    r = subprocess.run(
        [sys.executable, "-m", "janus_train.convert", "--src", str(tiny_hf_ckpt), "--src-format", "deepseek", "--dst", str(tmp_path / "o"), "--dst-format", "native"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "error:" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "janus_train.convert", "--src", str(tiny_hf_ckpt), "--src-format", "hf", "--dst", str(tmp_path / "o"), "--dst-format", "native"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_release_config_is_the_preset_it_was_made_from(tiny_deepseek_ckpt):
    """A release stores the gen head width explicitly; equal to the LLM width it reads as the
    preset's default, so `model.init_from=<release>` with that preset is not refused."""
    from janus_train.checkpoint.io import read_config
    from janus_train.models.janus.config import JanusConfig

    cfg = read_config(tiny_deepseek_ckpt)
    preset = JanusConfig.from_preset("tiny")
    assert cfg.vq.gen_head_hidden == preset.vq.gen_head_hidden and cfg.gen_head_hidden == preset.gen_head_hidden
