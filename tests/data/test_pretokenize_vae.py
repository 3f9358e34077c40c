"""JanusFlow's pre-tokenisation: gen images -> the VAE's posterior (mean, std, fp16) in the shards,
through the same driver as the VQ one (tests/data/test_cli.py covers its resumability and skips)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from janus_train.contracts.preprocess import gen_pixels, open_rgb
from janus_train.data import formats as fmt
from janus_train.data.shards import ShardReader, dataset_shards, read_janus_meta


@pytest.fixture(scope="module")
def flow_inputs(tmp_path_factory):
    """A tiny JanusFlow checkpoint, a small diffusers VAE for it, and a gen dataset of images."""
    from data_pipelines import build_shards, synthetic_shapes
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint
    from janus_train.training import tokenizer as tk

    root = tmp_path_factory.mktemp("flow")
    ckpt = make_tiny_checkpoint(root / "ckpt", fmt="deepseek", family="janusflow", preset="janusflow_tiny")
    torch.manual_seed(0)
    vae = tk.tiny_vae(latent_channels=4, downsample=8, width=8, sample_size=64)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(str(root / "vae"))
    synthetic_shapes.main(["--out", str(root / "raw"), "--n", "40", "--image-size", "80", "--seed", "5", "--workers", "1"])
    build_shards.build("gen", root / "raw" / "gen_real.jsonl", root / "gen", 8, source="real", progress=False)
    return {"root": root, "ckpt": ckpt, "vae": root / "vae", "gen": root / "gen"}


def _samples(ds):
    reader = ShardReader()
    return [raw for sh in dataset_shards(ds) for raw in reader.read(sh.path, 0, sh.count)]


def test_latent_distribution_in_the_shards(flow_inputs, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "gen_vae"
    r = subprocess.run([sys.executable, "-m", "data_pipelines.pretokenize_vae", "--ckpt", str(flow_inputs["ckpt"]), "--vae",
                        str(flow_inputs["vae"]), "--in", str(flow_inputs["gen"]), "--out", str(out), "--batch-size", "7"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "build_report.json").read_text())
    inputs = _samples(flow_inputs["gen"])
    assert report["written"] == len(inputs) > 0 and report["latent_shape"] == [4, 8, 8]
    meta = read_janus_meta(out)
    assert meta["builder"] == "pretokenize_vae" and meta["vae_scaling_factor"] == 0.5 and meta["latent_shape"] == [4, 8, 8]
    vae = AutoencoderKL.from_pretrained(str(flow_inputs["vae"])).eval()
    by_key = {raw.key: raw for raw in inputs}
    samples = _samples(out)
    assert len(samples) == len(inputs)
    for raw in samples[:6]:
        mean = np.load(io.BytesIO(raw.parts[fmt.LATENT_MEAN_PART]))
        std = np.load(io.BytesIO(raw.parts[fmt.LATENT_STD_PART]))
        assert mean.dtype == np.float16 and std.dtype == np.float16 and mean.shape == std.shape == (4, 8, 8)
        assert (std > 0).all()
        # The stored mean is the VAE's posterior mean of the gen-preprocessed image.
        x = gen_pixels(open_rgb(fmt.image_part(by_key[raw.key].parts)), 64)[None]
        with torch.no_grad():
            ref = vae.encode(x).latent_dist.mean[0].numpy().astype(np.float16)
        np.testing.assert_allclose(mean.astype(np.float32), ref.astype(np.float32), atol=2e-3, rtol=1e-2)
        assert fmt.image_part(raw.parts) is not None  # kept for representation alignment
        assert fmt.PROMPT_IDS_PART in raw.parts and json.loads(raw.parts["json"])["caption"]


def test_drop_image_and_refusals(flow_inputs, tmp_path, tiny_hf_ckpt):
    from data_pipelines.pretokenize_vae import pretokenize

    out = tmp_path / "no_image"
    pretokenize(flow_inputs["ckpt"], flow_inputs["vae"], flow_inputs["gen"], out, keep_image=False, progress=False)
    assert all(fmt.image_part(raw.parts) is None for raw in _samples(out))
    with pytest.raises(ValueError, match="not a JanusFlow checkpoint"):
        pretokenize(tiny_hf_ckpt, flow_inputs["vae"], flow_inputs["gen"], tmp_path / "x", progress=False)
    r = subprocess.run([sys.executable, "-m", "data_pipelines.pretokenize_vae", "--ckpt", str(flow_inputs["ckpt"]), "--vae",
                        str(tmp_path / "missing"), "--in", str(flow_inputs["gen"]), "--out", str(tmp_path / "y")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "error:" in r.stderr


def test_two_ranks_equal_one_process(flow_inputs, tmp_path):
    """The VAE builder shares the distributed driver: 2 ranks (with a decoding worker) write the
    same bytes as one process (tests/data/test_pretokenize_dist.py has the VQ side and torchrun)."""
    from data_pipelines.pretokenize_vae import pretokenize

    args = (flow_inputs["ckpt"], flow_inputs["vae"], flow_inputs["gen"])
    pretokenize(*args, tmp_path / "one", batch_size=4, progress=False)
    results = [pretokenize(*args, tmp_path / "two", batch_size=4, progress=False, rank=r, world_size=2, workers=1) for r in (1, 0)]
    assert [r["finalized"] for r in results] == [False, True]

    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert tree(tmp_path / "two") == tree(tmp_path / "one")
