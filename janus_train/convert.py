"""Convert Janus-Pro and JanusFlow checkpoints between layouts.

    python -m janus_train.convert --src DIR --src-format {hf,deepseek,native,train} \
                                  --dst DIR --dst-format {hf,native,deepseek,peft} [--dtype {keep,fp32,bf16,fp16}] \
                                  [--base HF_BASE]

  hf        transformers JanusForConditionalGeneration directory (config.json + safetensors)
  deepseek  the original release (config.json with language_config/..., pytorch_model*.bin or
            safetensors); pickles read with torch.load(weights_only=True) only. As a
            destination only for JanusFlow, which has no hf layout (written with safetensors)
  native    janus-train's own layout (config.json + safetensors)
  train     a janus-train training run directory or one of its checkpoints (exports the
            newest complete checkpoint's model weights). A LoRA run's checkpoint (finetune.mode=lora:
            peft adapters + base.json naming the base checkpoint) is merged into whole weights by
            peft (merge_and_unload, in fp32; --dtype keep writes the base's dtype)
  peft      destination only, from a LoRA run's checkpoint: a peft adapter directory
            (adapter_config.json + adapter_model.safetensors in transformers' module names) that
            peft.PeftModel.from_pretrained loads onto transformers' JanusForConditionalGeneration
            from our hf export of the base. base_model_name_or_path is --base (a local directory is
            checked to be the same model) or, when the run's base is an hf checkpoint, that one.
            Janus-Pro only: JanusFlow has no transformers class (merge its adapters instead)

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


def convert(src: str | Path, src_format: str, dst: str | Path, dst_format: str, dtype: str = "keep", base: str | None = None) -> Path:
    """Convert a checkpoint directory; returns the destination path."""
    if dst_format not in ("hf", "native", "deepseek", "peft"):
        raise CheckpointError(f"--dst-format must be hf, native, deepseek or peft, got {dst_format!r}")
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"--src {src} does not exist")
    if dst_format == "peft":
        if src_format != "train":
            raise CheckpointError(f"--dst-format peft exports the adapters of a LoRA training run: use --src-format train (got {src_format!r})")
        from janus_train.checkpoint.adapters import export_peft_adapter
        from janus_train.checkpoint.export import training_model_dir

        return export_peft_adapter(training_model_dir(src), dst, base=base, dtype=DTYPES[dtype])
    if base is not None:
        raise CheckpointError("--base is only used with --dst-format peft")
    if src_format == "train":
        from janus_train.checkpoint.export import read_training_checkpoint

        cfg, sd, aux = read_training_checkpoint(src, lora_dtype=DTYPES[dtype])  # a LoRA merge: straight to --dtype
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
    p.add_argument("--dst-format", required=True, help="hf | native | deepseek (JanusFlow's release layout) | peft (a LoRA run's adapters)")
    p.add_argument("--dtype", default="keep", help="keep (default) | fp32 | bf16 | fp16")
    p.add_argument("--base", default=None, help="with --dst-format peft: base_model_name_or_path (our hf export of the base, or a hub id)")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.src_format, args.dst, args.dst_format, args.dtype, base=args.base)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst_format} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
