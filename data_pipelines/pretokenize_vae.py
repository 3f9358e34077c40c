"""Encode the images of a gen dataset to VAE latent distributions (JanusFlow).

    python -m data_pipelines.pretokenize_vae --ckpt DIR --vae DIR --in DIR --out DIR
        [--batch-size B] [--device cpu|cuda] [--drop-image] [--workers N]
        [--rank R --world-size W] [--finalize-only]

--ckpt is a JanusFlow checkpoint (its tokenizer writes the prompts; its image size is the
generation size), --vae a diffusers `AutoencoderKL` directory: the SDXL-VAE for the released
model (stabilityai/sdxl-vae), or a tiny one from `train_tokenizer --kind vae`. Each sample
becomes `json`, `prompt_ids.npy`, `latent_mean.npy` and `latent_std.npy` (the posterior's mean
and standard deviation, fp16, unscaled [C, h, w]); the loader draws a latent from them at every
use and multiplies it by the VAE's `scaling_factor` (recorded in the dataset's janus meta). The
image is kept (representation alignment compares the LLM with SigLIP's view of the clean
image) unless --drop-image. Resumable per shard; bad samples are skipped and counted in
OUT/build_report.json (data_pipelines/pretokenize.py has the details). Distributed over
torchrun processes, a Slurm array or --rank/--world-size exactly like pretokenize_vq.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.pretokenize import ImageEncoder, add_distributed_args, default_workers, local_device, report_result, run
from janus_train.data import formats as fmt


def vae_meta(vae_config: Any, image_size: int) -> dict[str, Any]:
    """The janus meta of VAE latents, from the VAE's config (no weights needed)."""
    down = 2 ** (len(vae_config.block_out_channels) - 1)
    if image_size % down:
        raise ValueError(f"the VAE downsamples by {down}; image size {image_size} is not a multiple")
    side = image_size // down
    return {"latent_shape": [int(vae_config.latent_channels), side, side], "vae_scaling_factor": float(vae_config.scaling_factor)}


def vae_encoder(vae: Any, image_size: int, device: str) -> ImageEncoder:
    meta = vae_meta(vae.config, image_size)
    dtype = next(vae.parameters()).dtype

    def encode(x: torch.Tensor) -> list[dict[str, bytes]]:
        with torch.no_grad():
            post = vae.encode(x.to(device=device, dtype=dtype)).latent_dist
            mean, std = post.mean.float().cpu().numpy(), post.std.float().cpu().numpy()
        return [{fmt.LATENT_MEAN_PART: fmt.npy_bytes(m.astype(np.float16)), fmt.LATENT_STD_PART: fmt.npy_bytes(s.astype(np.float16))}
                for m, s in zip(mean, std)]

    return ImageEncoder("vae", image_size, encode, meta)


def pretokenize(ckpt: str | Path, vae_dir: str | Path, in_dir: str | Path, out_dir: str | Path, batch_size: int = 64,
                device: str = "cpu", keep_image: bool = True, progress: bool = True, *, rank: int | None = None,
                world_size: int | None = None, workers: int = 0, finalize_only: bool = False) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    from janus_train.checkpoint.io import read_config
    from janus_train.models.janusflow.config import JanusFlowConfig

    cfg = read_config(ckpt)
    if not isinstance(cfg, JanusFlowConfig):
        raise ValueError(f"{ckpt} is not a JanusFlow checkpoint (a Janus-Pro one takes data_pipelines.pretokenize_vq)")
    # The config alone gives the meta (a finalising or idle process loads no weights).
    vae_cfg = argparse.Namespace(**AutoencoderKL.load_config(str(vae_dir)))
    vae_cfg.scaling_factor = getattr(vae_cfg, "scaling_factor", 0.18215)
    if vae_cfg.latent_channels != cfg.flow.latent_channels:
        raise ValueError(f"the VAE has {vae_cfg.latent_channels} latent channels, the model {cfg.flow.latent_channels}")

    def load() -> Any:
        vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(device).eval()
        return vae_encoder(vae, cfg.image_size, device).encode

    encoder = ImageEncoder("vae", cfg.image_size, None, vae_meta(vae_cfg, cfg.image_size), load)
    return run(encoder, ckpt, in_dir, out_dir, batch_size, keep_image, progress, rank=rank, world_size=world_size,
               workers=workers, finalize_only=finalize_only)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="JanusFlow checkpoint directory (tokenizer and image size)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL directory")
    p.add_argument("--in", dest="in_dir", required=True, help="gen dataset with images (from build_shards)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--drop-image", action="store_true", help="do not keep the image (no representation alignment for these samples)")
    add_distributed_args(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    workers = default_workers() if args.workers is None else args.workers
    try:
        s = pretokenize(args.ckpt, args.vae, args.in_dir, args.out, args.batch_size, local_device(args.device),
                        not args.drop_image, rank=args.rank, world_size=args.world_size, workers=workers,
                        finalize_only=args.finalize_only)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    report_result(s, args.out)


if __name__ == "__main__":
    main()
