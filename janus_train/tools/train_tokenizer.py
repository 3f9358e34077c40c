"""Train a small image tokenizer on your images, for a tiny model whose generations decode.

    python -m janus_train.tools.train_tokenizer --data SRC --preset tiny --out DIR
        [--kind vq|vae] [--minutes 5 | --steps N] [--batch-size 16] [--lr 2e-3] [--held-out 256]
        [--max-images N] [--scorer shapes] [--seed 0] [--threads T] [--no-progress]
        [--vae-width 32] [--kl-weight 1e-4]
    python -m janus_train.tools.make_tiny_checkpoint CKPT --vq DIR    # a tiny model using it

SRC is a folder of images (same-named .txt files are their captions), a jsonl manifest as
data_pipelines.build_shards reads (`image` relative to the file, optional `caption`), or a
shard directory. Images get the gen preprocessing at the preset's image size. The last
--held-out images are not trained on; the report (printed and in DIR/report.json) gives their
reconstruction error, codebook use, and with --scorer and captions how often the scorer finds
the captioned shape and colour in the originals and in the reconstructions. DIR/recon.png shows
originals above reconstructions.

--kind vq trains the preset's VQ (the module Janus-Pro generates through; see
janus_train/training/tokenizer.py for the objective). --kind vae trains a small diffusers
AutoencoderKL (the SDXL-VAE's class, which JanusFlow generates through) for a JanusFlow preset
(janusflow_tiny ...): its latent channels and downsampling, --vae-width channels, pixel losses
plus --kl-weight x KL; DIR is a diffusers directory (AutoencoderKL.from_pretrained loads it) whose
scaling_factor is set from the training images' latents. Interrupted runs are not resumed: the
budget is minutes.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from janus_train.checkpoint.io import write_tokenizer_checkpoint, write_vae_checkpoint
from janus_train.models.janus.config import JanusConfig, parse_overrides
from janus_train.models.janusflow.config import PRESETS as FLOW_PRESETS
from janus_train.models.janusflow.config import JanusFlowConfig
from janus_train.models.janus.vq import VQTokenizer
from janus_train.training import tokenizer as tk

KINDS = ("vq", "vae")


def _settings(args: argparse.Namespace) -> tk.TrainSettings:
    return tk.TrainSettings(minutes=None if args.steps else args.minutes, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, restart_every=args.restart_every)


def _split_images(args: argparse.Namespace, size: int) -> tuple[tk.ImageSet, tk.ImageSet]:
    """(training images, the last --held-out ones) of --data at the model's image size."""
    images = tk.load_images(args.data, size, args.max_images, progress=not args.no_progress)
    if len(images) <= args.held_out:
        raise ValueError(f"--data has {len(images)} images, not more than --held-out {args.held_out}")
    return images.split(args.held_out)


def _report_files(model: torch.nn.Module, held_out: tk.ImageSet, report: dict) -> dict[str, bytes]:
    """report.json and recon.png (16 held-out originals above their reconstructions)."""
    recon, _ = tk.reconstruct(model, held_out.pixels[:16])
    return {"report.json": (json.dumps(report, indent=2) + "\n").encode(),
            "recon.png": tk.png_bytes(tk.comparison_grid(held_out.pixels, recon))}


def train_vae(args: argparse.Namespace) -> dict:
    if args.preset not in FLOW_PRESETS:
        raise ValueError(f"--kind vae trains a JanusFlow preset's VAE; --preset {args.preset!r} is not one of {sorted(FLOW_PRESETS)}")
    cfg = JanusFlowConfig.from_preset(args.preset, parse_overrides(args.override))
    size = cfg.image_size
    train_set, held_out = _split_images(args, size)
    vae = tk.tiny_vae(cfg.flow.latent_channels, cfg.flow.vae_downsample, args.vae_width, size)
    result = tk.train_vae(vae, train_set, _settings(args), kl_weight=args.kl_weight, progress=not args.no_progress)
    report = {
        "kind": "vae", "preset": args.preset, "image_size": size, "latent_size": cfg.latent_size,
        "latent_channels": cfg.flow.latent_channels, "width": args.vae_width, "kl_weight": args.kl_weight,
        "train_images": len(train_set), "steps": result.steps, "seconds": round(result.seconds, 1),
        "final_train_loss": result.history[-1] if result.history else None,
        "held_out": tk.reconstruction_report(vae, held_out, args.scorer),
    }
    write_vae_checkpoint(args.out, vae, _report_files(vae, held_out, report))
    return report


def train(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.kind == "vae":
        return train_vae(args)
    if args.preset in FLOW_PRESETS:
        raise ValueError(f"--preset {args.preset!r} is a JanusFlow preset: it generates through a VAE (--kind vae)")
    cfg = JanusConfig.from_preset(args.preset, parse_overrides(args.override))
    size = cfg.gen_image_size
    train_set, held_out = _split_images(args, size)
    vq = VQTokenizer(cfg.vq)
    result = tk.train_vq(vq, train_set, _settings(args), progress=not args.no_progress)
    report = {
        "kind": "vq", "preset": args.preset, "image_size": size, "codes_per_image": cfg.gen_grid**2,
        "codebook_size": cfg.vq.codebook_size, "train_images": len(train_set), "steps": result.steps,
        "seconds": round(result.seconds, 1), "final_train_loss": result.history[-1] if result.history else None,
        "held_out": tk.reconstruction_report(vq, held_out, args.scorer),
    }
    write_tokenizer_checkpoint(args.out, "vq", cfg.to_dict()["vq"], size, vq.state_dict(), _report_files(vq, held_out, report),
                               info={"preset": args.preset})
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m janus_train.tools.train_tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="image folder, jsonl manifest or shard directory")
    p.add_argument("--out", required=True, help="tokenizer checkpoint directory to write")
    p.add_argument("--kind", default="vq", choices=KINDS, help="tokenizer kind (default vq)")
    p.add_argument("--preset", default="tiny", help="model preset whose tokenizer to train (default tiny)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="model config override, e.g. vq.codebook_size=512")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of a time budget")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--restart-every", type=int, default=50, help="restart codes unused this many steps (0: never)")
    p.add_argument("--held-out", type=int, default=256, help="images kept out of training for the report (default 256)")
    p.add_argument("--max-images", type=int, default=20000, help="read at most this many images (default 20000)")
    p.add_argument("--scorer", default=None, help="score held-out reconstructions with this scorer (e.g. shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--vae-width", type=int, default=32, help="--kind vae: channels of the VAE's first levels (default 32)")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="--kind vae: weight of the KL term (default 1e-4)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("minutes", "batch_size", "lr", "held_out", "max_images", "vae_width"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.kl_weight < 0:
        print(f"error: --kl-weight must be >= 0, got {args.kl_weight}", file=sys.stderr)
        return 2
    try:
        report = train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print(f"wrote the {args.kind} tokenizer to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
