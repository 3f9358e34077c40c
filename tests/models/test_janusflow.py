"""JanusFlow's model (tiny): the three losses and where their gradients go, the release layout
(config and weights both ways, bit for bit; bad checkpoints named), the release's sizes."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch

from janus_train.models.janusflow import config_formats, keys
from janus_train.models.janusflow.config import JanusFlowConfig
from janus_train.contracts.batch import PackedBatch
from janus_train.models.janusflow.model import JanusFlowModel
from janus_train.models.summary import main as summary_main

IGNORE = -100


def _model(seed: int = 0) -> JanusFlowModel:
    torch.manual_seed(seed)
    model = JanusFlowModel(JanusFlowConfig.from_preset("janusflow_tiny"))
    model.init_weights(std=0.02, seed=seed)
    return model


def _row(cfg: JanusFlowConfig, und: bool = True, gen: bool = True, n_gen: int = 1, seq_len: int = 96, seed: int = 1) -> PackedBatch:
    """One packed row: [und doc: BOS, image (1 + patches), question, answer] [gen docs: prompt,
    time, latents]... padding; answers supervise CE, latents the flow and REPA losses."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, labels, task, und_m, time_m, lat_m, bounds = [], [], [], [], [], [], [], [0]

    def doc(kinds: list[str]) -> None:
        for i, k in enumerate(kinds):
            ids.append(int(torch.randint(5, cfg.llm.vocab_size, (1,), generator=g)))
            pos.append(i)
            und_m.append(k == "img")
            time_m.append(k == "time")
            lat_m.append(k == "lat")
            nxt = kinds[i + 1] if i + 1 < len(kinds) else None
            sup = nxt == "ans"
            labels.append(int(torch.randint(5, cfg.llm.vocab_size, (1,), generator=g)) if sup else IGNORE)
            task.append(0 if sup else -1)
        bounds.append(len(ids))

    if und:
        doc(["txt"] + ["img"] * cfg.num_und_tokens + ["txt"] * 3 + ["ans"] * 3)
    for _ in range(n_gen if gen else 0):
        doc(["txt"] * 5 + ["time"] + ["lat"] * cfg.num_gen_tokens)
    pad = seq_len - len(ids)
    assert pad >= 0
    if pad:
        doc(["pad"] * pad)
    side, lat = cfg.image_size, cfg.latent_size
    m = n_gen if gen else 0
    t = torch.tensor
    return PackedBatch(
        input_ids=t([ids]), position_ids=t([pos]), cu_seqlens=t(bounds, dtype=torch.int32), max_seqlen=max(b - a for a, b in zip(bounds, bounds[1:])),
        labels=t([labels]), loss_task=t([task]), und_image_mask=t([und_m]), gen_time_mask=t([time_m]), gen_input_mask=t([lat_m]),
        und_pixel_values=torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8, generator=g) if und else None,
        gen_latents=torch.randn(m, cfg.flow.latent_channels, lat, lat, generator=g) if m else None,
        gen_noise=torch.randn(m, cfg.flow.latent_channels, lat, lat, generator=g) if m else None,
        gen_t=torch.rand(m, generator=g) if m else None,
        gen_repa_pixels=torch.randint(0, 256, (m, 3, side, side), dtype=torch.uint8, generator=g) if m else None,
    )


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_losses_and_gradients():
    model = _model()
    batch = _row(model.config, n_gen=2, seq_len=128)
    out = model(batch)
    assert set(out.loss_sum) == {"und", "text", "flow", "repa"}
    assert int(out.count["und"]) == 3 and int(out.count["text"]) == 0
    assert int(out.count["flow"]) == 2 * 4 * 8 * 8 and int(out.count["repa"]) == 2 * 16
    # At init the velocity is ~0, so the flow loss is ~|x1 - z0|^2 (2 per element), and REPA's
    # cosine of unrelated vectors is ~0.
    assert 1.0 < float(out.loss_sum["flow"].detach() / out.count["flow"]) < 3.0
    assert 0.5 < float(out.loss_sum["repa"].detach() / out.count["repa"]) < 1.5
    total = sum(out.loss_sum[k] / out.count[k].clamp(min=1) for k in out.loss_sum)
    total.backward()
    for part in ("llm", "lm_head", "vision", "und_aligner", "gen_encoder", "gen_enc_aligner", "gen_dec_aligner", "gen_decoder", "repa_proj"):
        assert _grad_norm(getattr(model, part)) > 0, part
    assert model.und_begin.grad is not None and float(model.und_begin.grad.abs().sum()) > 0


def test_repa_does_not_train_siglip():
    model = _model()
    out = model(_row(model.config, und=False, n_gen=1))
    (out.loss_sum["repa"] + out.loss_sum["flow"]).backward()
    assert _grad_norm(model.repa_proj) > 0 and _grad_norm(model.gen_encoder) > 0
    assert _grad_norm(model.vision) == 0  # stop-gradient on the clean image's SigLIP features


def test_flow_time_and_target():
    """z_t = t x1 + (1 - t) z0 and v* = x1 - z0: at t = 1 the encoder sees the clean latent."""
    model = _model().eval()
    batch = _row(model.config, und=False, n_gen=1)
    batch.gen_t = torch.ones(1)
    seen = {}
    orig = model.encode_latents

    def spy(z_t, t):
        seen["z_t"], seen["t"] = z_t, t
        return orig(z_t, t)

    model.encode_latents = spy
    model(batch)
    torch.testing.assert_close(seen["z_t"], batch.gen_latents, rtol=0, atol=0)
    # The velocity head's input grid matches the latent grid.
    with torch.no_grad():
        tokens, t_emb, skip = orig(batch.gen_latents, batch.gen_t)
        v = model.decode_velocity(torch.zeros(1, model.config.num_gen_tokens, model.config.llm.hidden_size), skip, t_emb)
    assert tuple(v.shape) == tuple(batch.gen_latents.shape)


def test_mask_count_mismatch_is_named():
    model = _model()
    batch = _row(model.config, und=False, n_gen=1)
    batch.gen_latents = torch.cat([batch.gen_latents, batch.gen_latents])
    batch.gen_noise = torch.cat([batch.gen_noise, batch.gen_noise])
    batch.gen_t = torch.cat([batch.gen_t, batch.gen_t])
    with pytest.raises(ValueError, match="gen_input_mask marks 16 positions but 2 gen documents give 32"):
        model(batch)


@pytest.mark.parametrize("preset", ["janusflow_tiny", "janusflow_1_3b"])
def test_release_config_round_trip(preset):
    cfg = JanusFlowConfig.from_preset(preset)
    d = config_formats.config_to_release(cfg)
    assert config_formats.is_janusflow_release(d)
    back = config_formats.config_from_release(d, name=cfg.name)
    assert back == cfg
    if preset == "janusflow_1_3b":  # the release's sizes need no explicit ones
        assert "janus_train_sizes" not in d["vision_und_enc_config"]["params"]


def test_release_config_refuses_what_it_cannot_build():
    d = config_formats.config_to_release(JanusFlowConfig.from_preset("janusflow_tiny"))
    d["vision_gen_dec_config"]["params"]["upsamples"] = 2
    with pytest.raises(ValueError, match="upsamples=2 is not supported"):
        config_formats.config_from_release(d)
    d = config_formats.config_to_release(JanusFlowConfig.from_preset("janusflow_tiny"))
    d["vision_gen_enc_config"]["cls"] = "SomethingElse"
    with pytest.raises(ValueError, match="vision_gen_enc_config.cls='SomethingElse'"):
        config_formats.config_from_release(d)


def test_release_weights_round_trip_bitwise():
    model = _model(seed=3)
    cfg = model.config
    native = model.state_dict()
    release = keys.from_native(native, cfg, "deepseek")
    assert not any(k.startswith("repa_proj") for k in release)  # training only
    for k in ("beg_of_und_embed", "vision_und_enc_aligner.weight", "vision_gen_enc_model.in_conv.weight",
              "vision_gen_enc_model.time_embed.linear_1.weight", "vision_gen_enc_model.mid_block.res_blocks.1.channelwise_norm.weight",
              "vision_gen_dec_model.out_convs.0.unpatch_conv.weight", "vision_gen_dec_aligner_norm.weight",
              "language_model.lm_head.weight", "vision_und_enc_model.vision_tower.blocks.0.attn.qkv.weight"):
        assert k in release, k
    back = keys.to_native(release, cfg, "deepseek")
    expected = {k: v for k, v in native.items() if not k.startswith("repa_proj")}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    again = keys.from_native({**back, **{k: v for k, v in native.items() if k.startswith("repa_proj")}}, cfg, "deepseek")
    assert set(again) == set(release) and all(torch.equal(again[k], release[k]) for k in release)


def test_release_weights_errors_name_the_key():
    model = _model()
    cfg = model.config
    release = keys.from_native(model.state_dict(), cfg, "deepseek")
    bad = dict(release)
    bad["vision_gen_enc_aligner.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"vision_gen_enc_aligner\.weight.*\(3, 3\).*\(64, 32\)"):
        keys.to_native(bad, cfg, "deepseek")
    bad = dict(release)
    bad.pop("beg_of_und_embed")
    with pytest.raises(KeyError, match="beg_of_und_embed"):
        keys.to_native(bad, cfg, "deepseek")
    bad = dict(release, **{"vision_gen_dec_model.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="vision_gen_dec_model.extra.weight"):
        keys.to_native(bad, cfg, "deepseek")
    # The attention-pool head of DeepSeek's SigLIP is ignored explicitly.
    ok = dict(release, **{"vision_und_enc_model.vision_tower.attn_pool.latent": torch.zeros(1, 1, 32)})
    assert set(keys.to_native(ok, cfg, "deepseek")) == set(keys.to_native(release, cfg, "deepseek"))


def test_release_sizes():
    """The 1.3B preset has the paper's part sizes: SigLIP ~300M, generation encoder + decoder ~70M."""
    with torch.device("meta"):
        model = JanusFlowModel(JanusFlowConfig.from_preset("janusflow_1_3b"))
    count = lambda *parts: sum(p.numel() for n in parts for p in getattr(model, n).parameters())  # noqa: E731
    assert 290e6 < count("vision") < 320e6
    assert 65e6 < count("gen_encoder", "gen_decoder") < 80e6
    assert model.config.num_gen_tokens == 576 and model.config.num_und_tokens == 577 and model.config.latent_size == 48


def test_summary_counts_every_part():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert summary_main(["janusflow_tiny", "--json"]) == 0
    counts = json.loads(buf.getvalue())
    model = JanusFlowModel(JanusFlowConfig.from_preset("janusflow_tiny"))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["und_begin"] == model.config.llm.hidden_size and counts["repa_proj"] > 0


# ---- checkpoints: the tiny release-layout checkpoint, convert, load ----------------------------


def test_tiny_release_checkpoint_converts_and_loads(tmp_path):
    from janus_train.checkpoint.io import detect_format, load_pretrained, read_checkpoint
    from janus_train.convert import convert

    r = subprocess.run([sys.executable, "-m", "janus_train.tools.make_tiny_checkpoint", str(tmp_path / "rel"), "--family", "janusflow"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rel = tmp_path / "rel"
    d = json.loads((rel / "config.json").read_text())
    assert {"language_config", "vision_und_enc_config", "vision_gen_enc_config", "vision_gen_dec_config"} <= set(d)
    assert detect_format(rel) == "deepseek" and (rel / "tokenizer.json").is_file()
    cfg, sd = read_checkpoint(rel)
    assert isinstance(cfg, JanusFlowConfig) and not any(k.startswith("repa_proj") for k in sd)
    # release -> native -> release: every tensor bitwise, the tokenizer carried along.
    convert(rel, "deepseek", tmp_path / "nat", "native")
    convert(tmp_path / "nat", "native", tmp_path / "rel2", "deepseek")
    from safetensors.torch import load_file

    a, b = load_file(str(rel / "model.safetensors")), load_file(str(tmp_path / "rel2" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "rel2" / "tokenizer.json").is_file()
    # A model loads from it; the REPA projector (not in the release) is initialised, not garbage.
    model = load_pretrained(rel)
    assert isinstance(model, JanusFlowModel)
    w = model.repa_proj.layers[0].weight.detach()
    fan_in = w.shape[1]  # normal(0, 1/sqrt(fan_in)): outputs of order one (RepaProjector.init_)
    assert torch.isfinite(w).all() and 0.8 < float(w.std()) * fan_in**0.5 < 1.2
    assert torch.equal(model.und_begin.detach(), sd["und_begin"])


def test_convert_refusals(tmp_path):
    from janus_train.checkpoint.io import CheckpointError
    from janus_train.convert import convert
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    rel = make_tiny_checkpoint(tmp_path / "rel", fmt="deepseek", family="janusflow", preset="janusflow_tiny")
    with pytest.raises(CheckpointError, match="JanusFlow has no transformers"):
        convert(rel, "deepseek", tmp_path / "hf", "hf")
    with pytest.raises(ValueError, match="generates through a VAE"):
        make_tiny_checkpoint(tmp_path / "x", fmt="deepseek", family="janusflow", preset="janusflow_tiny", vq=tmp_path)
    pro = make_tiny_checkpoint(tmp_path / "pro", fmt="hf")
    with pytest.raises(CheckpointError, match="for JanusFlow only"):
        convert(pro, "hf", tmp_path / "pro_ds", "deepseek")


@pytest.mark.parametrize("mode,every", [("full", 2), ("selective", 2), ("selective", 1)])
def test_recompute_gives_identical_gradients(mode, every):
    """Activation checkpointing changes memory, not gradients (bit-identical on CPU)."""
    import copy

    model = _model().train()
    batch = _row(model.config, n_gen=2, seq_len=128)

    def grads(m):
        out = m(batch)
        sum(out.loss_sum[k] / out.count[k].clamp(min=1) for k in out.loss_sum).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads(copy.deepcopy(model))
    m = copy.deepcopy(model)
    m.apply_recompute(mode, every)
    assert any(layer.recompute_mode != "none" for layer in m.llm.layers)
    got = grads(m)
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        assert torch.equal(got[name], g), name


def test_recipe_is_table_1_with_the_papers_freeze_rules():
    """recipes/recipe/janusflow_1_3b.yaml: the paper's Table 1 per stage (our ratio order is
    und:text:gen), and the freeze rules: stage 1 only the new parts (LLM and SigLIP frozen),
    stage 2 all but SigLIP, stage 3 everything."""
    from janus_train.models.families import JANUSFLOW
    from janus_train.training.config import load_config, validate_config
    from janus_train.training.stages import apply_freeze

    run = validate_config(load_config(["+recipe=janusflow_1_3b"]), check_paths=False, complete=False)
    stages = {s.index: s for s in run.enabled_stages()}
    table1 = {1: (1e-4, 2000, 10_000, 512, (50, 0, 50)), 2: (1e-4, 2000, 390_000, 512, (14, 6, 80)), 3: (2e-5, 1000, 26_000, 256, (21, 9, 70))}
    for i, (lr, warmup, steps, batch, ratio) in table1.items():
        s = stages[i]
        assert (s.lr, s.warmup_steps, s.steps, s.global_batch, s.decay) == (lr, warmup, steps, batch, "constant"), i
        assert tuple(s.ratio) == ratio, i
    assert stages[2].ratio_phases == [(10_000, (30, 20, 50))] and not stages[1].ratio_phases and not stages[3].ratio_phases
    assert tuple(run.train.optimizer.betas) == (0.9, 0.95) and run.train.optimizer.weight_decay == 0 and run.train.grad_clip == 1.0
    assert run.data.seq_len == 4096 and run.model.family is JANUSFLOW
    with torch.device("meta"):
        model = JanusFlowModel(run.model.model_config_for())
    new_parts = {"und_aligner", "und_begin", "gen_encoder", "gen_enc_aligner", "gen_dec_norm", "gen_dec_aligner", "gen_decoder", "repa_proj"}
    expect = {1: new_parts, 2: set(JANUSFLOW.components) - {"vision"}, 3: set(JANUSFLOW.components)}
    for i, trains in expect.items():
        state = apply_freeze(model, stages[i].trainable)
        assert {c for c, on in state.items() if on} == trains, i
        for comp in JANUSFLOW.components:
            params = [model.und_begin] if comp == "und_begin" else list(getattr(model, comp).parameters())
            assert all(p.requires_grad == (comp in trains) for p in params), (i, comp)


def test_trainable_names_are_checked_against_the_family():
    from janus_train.training.config import ConfigError, load_config, validate_config

    cfg = load_config(["+recipe=janusflow_1_3b", "train.stages.stage1.trainable=[gen_head]"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, check_paths=False, complete=False)
    assert e.value.key == "train.stages.stage1.trainable" and "gen_head" in str(e.value)
