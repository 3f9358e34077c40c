"""The tokenizer trainer: it trains the model's own VQ module on a folder / manifest / shards,
reports held-out reconstruction and codebook use, and its output drops into a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from janus_train.checkpoint.io import CheckpointError, read_tokenizer_checkpoint
from janus_train.models.janus.config import JanusConfig
from janus_train.models.janus.vq import VQTokenizer
from janus_train.training import tokenizer as tk


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Flat-colour squares and circles, each with a same-named caption file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    from janus_train.eval.shapes import COLORS, render

    names = list(COLORS)
    for i in range(48):
        bg, fg = rng.choice(len(names), 2, replace=False)
        kind = ("square", "circle")[i % 2]
        scene = {"background": names[bg], "shapes": [{"shape": kind, "color": names[fg], "x": 0.5, "y": 0.5, "r": 0.3}]}
        render(scene, 80, 80, noise=0).save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text(f"A {names[fg]} {kind} at the center on a {names[bg]} background.")
    return root


def test_loss_falls_and_the_objective_is_the_models_path(image_folder):
    cfg = JanusConfig.from_preset("tiny")
    images = tk.load_images(image_folder, cfg.gen_image_size, progress=False)
    assert images.pixels.shape == (48, 3, 64, 64) and images.pixels.dtype == torch.uint8
    assert images.captions[0].startswith("A ")
    torch.manual_seed(0)
    vq = VQTokenizer(cfg.vq)
    result = tk.train_vq(vq, images, tk.TrainSettings(minutes=None, steps=30, batch_size=8, lr=3e-3), progress=False)
    first = np.mean([h["reconstruction"] for h in result.history[:5]])
    last = np.mean([h["reconstruction"] for h in result.history[-5:]])
    assert result.steps == 30 and last < first
    # The loss's quantisation is the model's own lookup: its codes are encode_codes'.
    x = tk.to_model_range(images.pixels[:4])
    losses, _ = tk.vq_losses(vq, x, 0.25)
    assert torch.equal(losses.codes.view(4, -1), vq.encode_codes(x))


def test_cli_writes_a_tokenizer_a_tiny_checkpoint_can_use(image_folder, tmp_path):
    out = tmp_path / "vq"
    r = subprocess.run([sys.executable, "-m", "janus_train.tools.train_tokenizer", "--data", str(image_folder), "--preset", "tiny",
                        "--out", str(out), "--steps", "10", "--held-out", "8", "--scorer", "shapes", "--no-progress", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    held = report["held_out"]
    assert report["steps"] == 10 and held["images"] == 8 and held["scored_images"] == 8
    assert 0 < held["codebook_used"] <= 1 and held["psnr_db"] > 0
    assert held["scorer_rate_originals"] == 1.0  # the scorer reads the drawn originals
    assert Image.open(out / "recon.png").size == (8 * 64, 2 * 64)
    meta, sd = read_tokenizer_checkpoint(out)
    assert meta["kind"] == "vq" and meta["image_size"] == 64

    from janus_train.checkpoint.io import read_checkpoint
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", fmt="hf", vq=out)
    _, native = read_checkpoint(ckpt)
    assert all(torch.equal(native[f"vq.{k}"], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="another model config"):
        make_tiny_checkpoint(tmp_path / "mini", fmt="hf", preset="mini", vq=out)


def test_cli_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "janus_train.tools.train_tokenizer", "--data", str(tmp_path / "empty"), "--out",
                        str(tmp_path / "o"), "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no readable images" in r.stderr


# ---- the VAE kind (JanusFlow) -------------------------------------------------------------------


def test_vae_loss_falls_and_sets_its_scaling_factor(image_folder):
    images = tk.load_images(image_folder, 64, progress=False)
    torch.manual_seed(0)
    vae = tk.tiny_vae(latent_channels=4, downsample=8, width=16, sample_size=64)
    result = tk.train_vae(vae, images, tk.TrainSettings(minutes=None, steps=30, batch_size=8, lr=2e-3), progress=False)
    first = np.mean([h["reconstruction"] for h in result.history[:5]])
    last = np.mean([h["reconstruction"] for h in result.history[-5:]])
    assert result.steps == 30 and last < first and all(h["kl"] >= 0 for h in result.history)
    with torch.no_grad():
        means = vae.encode(tk.to_model_range(images.pixels)).latent_dist.mean
    assert means.shape == (48, 4, 8, 8)
    # Scaled latents have unit spread on the training images (the flow's noise is N(0, I)).
    assert abs(float(means.std()) * vae.config.scaling_factor - 1.0) < 0.1


def test_vae_cli_writes_a_diffusers_autoencoder(image_folder, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "vae"
    r = subprocess.run([sys.executable, "-m", "janus_train.tools.train_tokenizer", "--kind", "vae", "--data", str(image_folder),
                        "--preset", "janusflow_tiny", "--out", str(out), "--steps", "10", "--held-out", "8", "--scorer", "shapes",
                        "--vae-width", "16", "--no-progress", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    held = report["held_out"]
    assert report["kind"] == "vae" and report["latent_size"] == 8 and held["latent_shape"] == [4, 8, 8]
    assert held["scorer_rate_originals"] == 1.0 and held["psnr_db"] > 0 and held["scaling_factor"] > 0
    # A real client loads it: diffusers' own from_pretrained, as it loads the SDXL-VAE.
    vae = AutoencoderKL.from_pretrained(str(out))
    assert vae.config.scaling_factor == pytest.approx(held["scaling_factor"])
    images = tk.load_images(image_folder, 64, limit=2, progress=False)
    with torch.no_grad():
        z = vae.encode(tk.to_model_range(images.pixels)).latent_dist.mean
        assert tuple(vae.decode(z).sample.shape) == (2, 3, 64, 64)


def test_vae_cli_refuses_a_janus_pro_preset(image_folder, tmp_path):
    r = subprocess.run([sys.executable, "-m", "janus_train.tools.train_tokenizer", "--kind", "vae", "--data", str(image_folder),
                        "--preset", "tiny", "--out", str(tmp_path / "o"), "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--preset 'tiny' is not one of" in r.stderr
    r = subprocess.run([sys.executable, "-m", "janus_train.tools.train_tokenizer", "--data", str(image_folder),
                        "--preset", "janusflow_tiny", "--out", str(tmp_path / "o"), "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--kind vae" in r.stderr
