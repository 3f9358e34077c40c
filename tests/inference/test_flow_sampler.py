"""JanusFlow inference on the tiny release-layout checkpoint: the flow sampler equals a plain
restatement of DeepSeek's demo loop (full-length rows, masked attention written here), the
generate CLI writes images through a diffusers VAE, and chat puts the und image's begin
embedding at <begin_of_image>."""

from __future__ import annotations

import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from janus_train.checkpoint.io import load_pretrained, load_tokenizer
from janus_train.contracts.preprocess import und_pixels
from janus_train.contracts.tokens import TokenizerInfo
from janus_train.inference import flow as flow_mod
from janus_train.inference.flow import FlowSampleConfig, generate_latents, latents_to_images, load_vae
from janus_train.inference.t2i import prompt_ids as gen_prompt_ids
from janus_train.inference.understand import answer, embed_prompt, und_image_mask
from janus_train.inference.understand import prompt_ids as und_prompt_ids

CAPTION = "a red circle on the left"


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory):
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("janusflow") / "tiny_flow"
    make_tiny_checkpoint(path, fmt="deepseek", seed=0, preset="janusflow_tiny", family="janusflow")
    return path


@pytest.fixture(scope="module")
def flow(flow_ckpt):
    return load_pretrained(flow_ckpt), TokenizerInfo.of(load_tokenizer(flow_ckpt))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from janus_train.training.tokenizer import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae(latent_channels=4, downsample=8, width=8, sample_size=64)
    vae.register_to_config(scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(str(path))
    return path


# ---- the reference: DeepSeek's demo loop, restated -------------------------------------------------


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding at positions 0..S-1 (rotate-half convention), x [B, heads, S, D]."""
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def _masked_llm(llm, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The decoder over full rows x [B, S, H] with plain arange positions and an explicit boolean
    attention mask keep [B, S, S] (query, key); our blocks' weights, attention written out here."""
    cfg = llm.cfg
    b, s, _ = x.shape
    hd = cfg.head_dim
    for layer in llm.layers:
        a, h = layer.attn, layer.attn_norm(x)
        q = a.q_proj(h).view(b, s, cfg.num_heads, hd).transpose(1, 2)
        k = a.k_proj(h).view(b, s, cfg.num_kv_heads, hd).transpose(1, 2)
        v = a.v_proj(h).view(b, s, cfg.num_kv_heads, hd).transpose(1, 2)
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        probs = scores.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
        x = x + a.o_proj((probs @ v).transpose(1, 2).reshape(b, s, -1))
        x = x + layer.mlp(layer.mlp_norm(x))
    return llm.norm(x)


@torch.no_grad()
def deepseek_loop(model, tok, caption: str, n: int, steps: int, w: float, seed: int, cond_only: bool = False) -> torch.Tensor:
    """demo/app_janusflow.py `generate`: cond rows then uncond rows (prompt ids -> pad after BOS),
    the final <begin_of_image> dropped, [prompt, t_emb, latents] recomputed at every step with
    an attention mask hiding the uncond rows' prompt keys 1..P-1."""
    cfg = model.config
    ids = gen_prompt_ids(tok, caption)
    rows = 1 if cond_only else 2
    tokens = torch.tensor([ids] * (rows * n))
    tokens[n:, 1:] = tok.pad_id
    prompt = model.llm.embed_tokens(tokens)[:, :-1]
    p, g = prompt.shape[1], cfg.num_gen_tokens
    s = p + 1 + g
    visible = torch.ones(rows * n, s, dtype=torch.bool)
    visible[n:, 1:p] = False
    keep = torch.ones(s, s, dtype=torch.bool).tril()[None] & visible[:, None, :]
    side = cfg.latent_size
    z = torch.randn((n, cfg.flow.latent_channels, side, side), generator=torch.Generator().manual_seed(seed))
    dt = torch.zeros_like(z) + 1.0 / steps
    for step in range(steps):
        z_in = torch.cat([z] * rows)
        t = torch.tensor([step / steps * 1000.0] * z_in.shape[0])
        feats, t_emb, skip = model.gen_encoder(z_in, t)
        z_emb = model.gen_enc_aligner(feats.view(feats.shape[0], feats.shape[1], -1).permute(0, 2, 1))
        hidden = _masked_llm(model.llm, torch.cat([prompt, t_emb[:, None], z_emb], 1), keep)
        h = model.gen_dec_aligner(model.gen_dec_norm(hidden[:, -g:]))
        h = h.reshape(z_in.shape[0], cfg.gen_grid, cfg.gen_grid, -1).permute(0, 3, 1, 2)
        v = model.gen_decoder(h, skip, t_emb)
        if not cond_only:
            v_cond, v_uncond = v.chunk(2)
            v = w * v_cond - (w - 1.0) * v_uncond
        z = z + dt * v
    return z


def test_sampler_equals_deepseeks_loop(flow):
    model, tok = flow
    n, steps, seed = 2, 30, 7
    mine = generate_latents(model, tok, CAPTION, n, FlowSampleConfig(steps=steps, cfg_weight=2.0),
                            generator=torch.Generator().manual_seed(seed))
    ref = deepseek_loop(model, tok, CAPTION, n, steps, 2.0, seed)
    assert mine.shape == (n, 4, 8, 8) and mine.dtype == torch.float32
    assert (mine - ref).abs().max() <= 1e-5
    # The check has teeth: the ODE moved the noise, and guidance changed the result.
    z0 = torch.randn(mine.shape, generator=torch.Generator().manual_seed(seed))
    cond = generate_latents(model, tok, CAPTION, n, FlowSampleConfig(steps=steps, cfg_weight=1.0),
                            generator=torch.Generator().manual_seed(seed))
    assert (mine - z0).abs().max() > 1e-2 and (mine - cond).abs().max() > 1e-3
    # w = 1 is the conditional ODE alone.
    assert (cond - deepseek_loop(model, tok, CAPTION, n, steps, 1.0, seed, cond_only=True)).abs().max() <= 1e-5


def test_sample_config_validation():
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        FlowSampleConfig(steps=0).validate()
    with pytest.raises(ValueError, match="got 2.5"):
        FlowSampleConfig(steps=2.5).validate()
    with pytest.raises(ValueError, match="cfg_weight must be a finite number >= 0, got nan"):
        FlowSampleConfig(cfg_weight=float("nan")).validate()
    with pytest.raises(ValueError, match="got -1"):
        FlowSampleConfig(cfg_weight=-1.0).validate()
    assert FlowSampleConfig().validate() == FlowSampleConfig(steps=30, cfg_weight=2.0)


def test_latents_to_images(flow, vae_dir):
    vae = load_vae(vae_dir)
    images = latents_to_images(vae, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), batch_size=2)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="cannot load a diffusers AutoencoderKL"):
        load_vae(vae_dir.parent / "missing")


# ---- the generate CLI ---------------------------------------------------------------------------------


def test_generate_cli_writes_pngs(flow_ckpt, vae_dir, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "janus_train.generate", "--ckpt", str(flow_ckpt), "--vae", str(vae_dir), "--prompt", "a green square",
         "--num", "2", "--steps", "3", "--seed", "1", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    pngs = sorted(tmp_path.glob("a_green_square_*.png"))
    assert len(pngs) == 2
    img = Image.open(pngs[0])
    assert img.size == (64, 64) and img.mode == "RGB"
    assert (tmp_path / "grid.png").is_file()


def test_generate_cli_family_options(flow_ckpt, vae_dir, tmp_path, capsys, monkeypatch):
    from janus_train import generate

    base = ["--ckpt", str(flow_ckpt), "--prompt", "x", "--out", str(tmp_path)]
    assert generate.main(base) == 2
    err = capsys.readouterr().err
    assert "--vae" in err and "required" in err
    assert generate.main(base + ["--vae", str(vae_dir), "--temperature", "0.5"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert generate.main(base + ["--vae", str(vae_dir), "--steps", "0"]) == 2
    assert "steps must be" in capsys.readouterr().err
    assert generate.main(base + ["--vae", str(tmp_path / "nope")]) == 2
    assert "cannot load a diffusers AutoencoderKL" in capsys.readouterr().err
    # --cfg resolves per family: 2 for JanusFlow unless given.
    seen = []

    def fake(model, tok, caption, num, sample, generator=None, progress=False):
        seen.append(sample)
        return torch.zeros(num, 4, 8, 8)

    monkeypatch.setattr(generate, "generate_latents", fake)
    assert generate.main(base + ["--vae", str(vae_dir), "--num", "1"]) == 0
    assert generate.main(base + ["--vae", str(vae_dir), "--num", "1", "--cfg", "3.5"]) == 0
    assert [(s.steps, s.cfg_weight) for s in seen] == [(30, 2.0), (30, 3.5)]
    # Janus-Pro refuses the JanusFlow options (the family check needs only the config).
    args = types.SimpleNamespace(ckpt="pro", vae="v", steps=None, temperature=None, top_k=None, greedy=False)
    assert "--vae" in generate._family_options(args, flow=False)
    assert generate._family_options(types.SimpleNamespace(**{**vars(args), "vae": None}), flow=False) is None


# ---- chat ---------------------------------------------------------------------------------------------


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))


def test_und_embeddings_cover_begin_and_patches(flow, image):
    model, tok = flow
    cfg = model.config
    ids = und_prompt_ids(tok, cfg.num_image_tokens, "What is this?", system=None)
    ids_t = torch.tensor([ids])
    pixels = und_pixels(image.convert("RGB"), cfg.vision.image_size)[None]
    with torch.no_grad():
        embeds = embed_prompt(model, tok, ids_t, pixels)
        und = model.embed_und_images(pixels)[0]
        text = model.llm.embed_tokens(ids_t)[0]
    assert und.shape[0] == cfg.num_und_tokens == cfg.num_image_tokens + 1
    b = ids.index(tok.boi_id)
    assert ids[b + 1 : b + und.shape[0]] == [tok.image_id] * cfg.num_image_tokens
    torch.testing.assert_close(embeds[0, b : b + und.shape[0]], und, rtol=0, atol=0)
    rest = torch.ones(len(ids), dtype=torch.bool)
    rest[b : b + und.shape[0]] = False
    torch.testing.assert_close(embeds[0, rest], text[rest], rtol=0, atol=0)
    # Janus-Pro's layout leaves <begin_of_image> a token; a <begin_of_image> not followed by
    # placeholders is never an image position.
    t = TokenizerInfo(None, 1, 2, 0, image_id=9, boi_id=8, eoi_id=7, fingerprint="")
    demo = torch.tensor([[1, 8, 9, 9, 7, 8, 5, 8]])
    assert und_image_mask(demo, t, with_begin=True).tolist() == [[False, True, True, True, False, False, False, False]]
    assert und_image_mask(demo, t, with_begin=False).tolist() == [[False, False, True, True, False, False, False, False]]


def test_chat_answers_on_janusflow(flow, flow_ckpt, image, tmp_path, capsys):
    model, tok = flow
    text, ids = answer(model, tok, image, "What is in the image?", max_new_tokens=6, system=None)
    assert isinstance(text, str) and 0 < len(ids) <= 6 and all(isinstance(i, int) for i in ids)
    # The same through the chat command.
    from janus_train import chat

    path = tmp_path / "img.png"
    image.save(path)
    assert chat.main(["--ckpt", str(flow_ckpt), "--image", str(path), "--question", "What?", "--max-new-tokens", "4"]) == 0
