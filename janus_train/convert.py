"""Convert Janus-Pro and JanusFlow checkpoints between layouts.

    python -m janus_train.convert --src DIR --src-format {hf,deepseek,native,train} \
                                  --dst DIR --dst-format {hf,native,deepseek} [--dtype {keep,fp32,bf16,fp16}]

  hf        transformers JanusForConditionalGeneration directory (config.json + safetensors)
  deepseek  the original release (config.json with language_config/..., pytorch_model*.bin or
            safetensors); pickles read with torch.load(weights_only=True) only. As a
            destination only for JanusFlow, which has no hf layout (written with safetensors)
  native    janus-train's own layout (config.json + safetensors)
  train     a janus-train training run directory or one of its checkpoints (exports the
            newest complete checkpoint's model weights)

Tensors are converted without touching their values (unless --dtype asks), so
hf -> native -> hf is bitwise identical per tensor. Tokenizer/processor files are carried along;
--dst-format hf replaces DeepSeek's processor files (VLMImageProcessor, VLChatProcessor) by
transformers' JanusImageProcessor / JanusProcessor ones, so transformers loads the result.
Every key and shape is checked before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from janus_train.checkpoint.io import CheckpointError, read_checkpoint, write_checkpoint
from janus_train.models.janusflow.config import JanusFlowConfig

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert(src: str | Path, src_format: str, dst: str | Path, dst_format: str, dtype: str = "keep") -> Path:
    """Convert a checkpoint directory; returns the destination path."""
    if dst_format not in ("hf", "native", "deepseek"):
        raise CheckpointError(f"--dst-format must be hf, native or deepseek, got {dst_format!r}")
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"--src {src} does not exist")
    if src_format == "train":
        from janus_train.checkpoint.export import read_training_checkpoint

        cfg, sd, aux = read_training_checkpoint(src)
    elif src_format in ("hf", "deepseek", "native"):
        cfg, sd = read_checkpoint(src, src_format)
        aux = src
    else:
        raise CheckpointError(f"--src-format must be one of hf, deepseek, native, train; got {src_format!r}")
    if dst_format == "deepseek" and not isinstance(cfg, JanusFlowConfig):
        raise CheckpointError("--dst-format deepseek is written for JanusFlow only; export Janus-Pro as hf (transformers loads it)")
    target = DTYPES[dtype]
    if target is not None:
        sd = {k: v.to(target) if v.is_floating_point() else v for k, v in sd.items()}
    return write_checkpoint(dst, cfg, sd, fmt=dst_format, aux_from=aux)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m janus_train.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="source checkpoint directory")
    p.add_argument("--src-format", required=True, help="hf | deepseek | native | train")
    p.add_argument("--dst", required=True, help="destination directory (replaced atomically if it exists)")
    p.add_argument("--dst-format", required=True, help="hf | native | deepseek (JanusFlow's release layout)")
    p.add_argument("--dtype", default="keep", help="keep (default) | fp32 | bf16 | fp16")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.src_format, args.dst, args.dst_format, args.dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst_format} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
