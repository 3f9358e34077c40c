"""Checkpoint directories of whole models: reading, writing and loading them, in three layouts,
for both model families (Janus-Pro; JanusFlow, which has no hf layout).

  native    config.json {"format": "janus_train", "janus_config" | "janusflow_config": {...}}
            + model*.safetensors
  hf        transformers JanusForConditionalGeneration: config.json + model*.safetensors
  deepseek  the original release: config.json (language_config, vision_config, ... or, for
            JanusFlow, vision_und_enc_config, vision_gen_enc_config, ...) + model*.safetensors or
            pytorch_model*.bin pickles, read with torch.load(weights_only=True) only

Tokenizer / processor files travel with the weights; an hf checkpoint gets transformers' Janus
processor files in place of DeepSeek's (checkpoint/processor.py). A missing, truncated or
corrupt weight file is a CheckpointError naming it. Directories are written to a temporary
sibling and renamed into place, so a crash never leaves a half-written checkpoint under the
final name.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import pickle
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from janus_train.checkpoint.sharded import WEIGHTS_KEY, ShardedCheckpointError, consolidate, sharded_source
from janus_train.checkpoint.processor import ProcessorFilesError, image_token_id, token_ids, write_generation_config, write_hf_processor
from janus_train.models.janus import config_formats, keys
from janus_train.models.janus.config import JanusConfig
from janus_train.models.janusflow import config_formats as flow_formats
from janus_train.models.janusflow import keys as flow_keys
from janus_train.models.janusflow.config import TRAINING_ONLY as FLOW_TRAINING_ONLY
from janus_train.models.janusflow.config import JanusFlowConfig

ModelConfig = JanusConfig | JanusFlowConfig

NATIVE_MARKER = "janus_train"
FORMATS = ("native", *keys.FORMATS)
# Files that belong to the tokenizer/processor, carried along by conversions.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)
MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked; the message says why."""


# A LoRA run's checkpoint model/ directory: peft's adapter files + base.json naming the base
# (checkpoint/adapters.py); read as the base with the adapters merged.
LORA_FORMAT = "lora"


def detect_format(path: str | Path) -> str:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        if (Path(path) / "adapter_config.json").is_file() and (Path(path) / "base.json").is_file():
            return LORA_FORMAT
        raise CheckpointError(f"{path}: no config.json, not a checkpoint directory")
    d = json.loads(cfg_path.read_text())
    if d.get("format") == NATIVE_MARKER:
        return "native"
    if d.get("model_type") == "janus":
        return "hf"
    if "language_config" in d:
        return "deepseek"
    raise CheckpointError(f"{cfg_path}: cannot tell the checkpoint format (model_type={d.get('model_type')!r})")


def read_config(path: str | Path, fmt: str | None = None) -> ModelConfig:
    fmt = fmt or detect_format(path)
    if fmt == LORA_FORMAT:
        from janus_train.checkpoint.adapters import read_base

        base, base_fmt = read_base(path)
        return read_config(base, base_fmt)
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json, not a checkpoint directory")
    try:
        return _config_from_dict(json.loads(cfg_path.read_text()), path, fmt)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is not a valid {fmt} config: {e}") from None


def _config_from_dict(d: dict, path: str | Path, fmt: str) -> ModelConfig:
    if fmt == "native":
        if d.get("format") != NATIVE_MARKER:
            raise CheckpointError(f"{path}: config.json is not a janus_train native config")
        if "janusflow_config" in d:
            return JanusFlowConfig.from_dict(d["janusflow_config"])
        return JanusConfig.from_dict(d["janus_config"])
    if fmt == "hf":
        if d.get("model_type") != "janus":
            raise CheckpointError(f"{path}: config.json model_type={d.get('model_type')!r}, expected 'janus' for --format hf")
        return config_formats.config_from_hf(d, name=Path(path).name)
    if fmt == "deepseek":
        if flow_formats.is_janusflow_release(d):
            return flow_formats.config_from_release(d, name=Path(path).name)
        return config_formats.config_from_deepseek(d, name=Path(path).name)
    raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


# Files read with mmap=True: base address -> (size, the mmap). Weak: a map closes when the last
# tensor viewing it is gone.
_MAPPED: dict[int, tuple[int, weakref.ref]] = {}


def _map_file(fp: Path) -> torch.Tensor:
    """The file's bytes as a uint8 tensor over a private (copy-on-write) memory map."""
    with open(fp, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    raw = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the map alive while any view of it lives
    _MAPPED[raw.data_ptr()] = (len(mm), weakref.ref(mm))
    return raw


def release_pages(t: torch.Tensor) -> None:
    """Drop the pages under a tensor read with mmap=True from this process's resident memory
    (a later read faults them in from the file again). Loading weight by weight and releasing
    each keeps a process's peak at one tensor's pages, not the whole file's. Other tensors: no-op."""
    ptr, n = t.data_ptr(), t.numel() * t.element_size()
    for base, (size, ref) in list(_MAPPED.items()):
        mm = ref()
        if mm is None:
            _MAPPED.pop(base, None)
        elif base <= ptr < base + size:
            start = (ptr - base) // mmap.PAGESIZE * mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, start, min(size, ptr - base + n) - start)
            return


def _mmap_safetensors(fp: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private memory map of it: nothing is
    read until a tensor's bytes are used, and then only those pages (a ZeRO-3 rank touches its
    slices only). The format is a little-endian u64 header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the bytes."""
    size = fp.stat().st_size
    with open(fp, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise SafetensorError(f"header length {n} does not fit a file of {size} bytes")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    raw = _map_file(fp)
    out = {}
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info["dtype"])
        start, end = (8 + n + int(o) for o in info["data_offsets"])
        if dtype is None or end > size:
            raise SafetensorError(f"tensor {name!r}: dtype {info['dtype']} / bytes {start}..{end} of {size}")
        piece = raw[start:end]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if start % itemsize:  # unaligned (a writer without padding): a copy, still one tensor at a time
            piece = piece.clone()
        out[name] = piece.view(dtype).view(info["shape"])
    return out


def load_weight_file(fp: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one weight file (safetensors, or a pickle read with weights_only=True);
    CheckpointError naming the file when it is missing, truncated or corrupt. `mmap`: views of
    the file's memory map instead of copies (read on use; read-only in spirit: a write to one
    changes this process's private copy of the page, never the file)."""
    fp = Path(fp)
    if not fp.is_file():
        raise CheckpointError(f"{fp}: missing weight file")
    try:
        if fp.suffix == ".safetensors":
            return _mmap_safetensors(fp) if mmap else load_file(str(fp))
        # weights_only: a checkpoint is data; never execute pickled code from it.
        if mmap:
            try:
                return torch.load(fp, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                pass  # a legacy (non-zip) pickle cannot be mapped: read it whole below
        return torch.load(fp, map_location="cpu", weights_only=True)
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{fp}: truncated or corrupt safetensors file ({e}); copy or download it again") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{fp}: corrupt, or a pickle of more than tensors (torch.load(weights_only=True) refused it: {_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{fp}: truncated or corrupt weight file ({_first_line(e)}); copy or download it again") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__


def _read_index(index: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid weight index ({type(e).__name__}: {e})") from None


def _read_tensors(path: Path, fmt: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    if fmt == "native" and sharded_source(path) is not None:
        # A periodic training checkpoint: the weights are DeepSpeed's shards next to it.
        try:
            return consolidate(path)
        except (ShardedCheckpointError, OSError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for f in _read_index(index):
            out.update(load_weight_file(path / f, mmap))
        return out
    if (path / "model.safetensors").is_file():
        return load_weight_file(path / "model.safetensors", mmap)
    if fmt == "deepseek":
        bin_index = path / "pytorch_model.bin.index.json"
        files = _read_index(bin_index) if bin_index.is_file() else ["pytorch_model.bin"]
        out = {}
        for f in files:
            out.update(load_weight_file(path / f, mmap))
        return out
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def family_keys(cfg: ModelConfig):
    """The state-dict table module (`to_native`, `from_native`, `FORMATS`) of cfg's family."""
    return flow_keys if isinstance(cfg, JanusFlowConfig) else keys


def read_checkpoint(path: str | Path, fmt: str | None = None, mmap: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, native state dict) from a checkpoint directory, fully validated. A JanusFlow
    release has no tensors for the training-only parts (the caller keeps their initialisation).
    `mmap`: the tensors are views of the weight files' memory maps (load_weight_file), so
    reading the whole model costs no memory until its values are used."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == LORA_FORMAT:
        from janus_train.checkpoint.adapters import read_lora_checkpoint

        return read_lora_checkpoint(path)
    cfg = read_config(path, fmt)
    external = _read_tensors(path, fmt, mmap)
    try:
        native = family_keys(cfg).to_native(external, cfg, fmt)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e.args[0] if e.args else e}") from None
    return cfg, native


def _save_safetensors(sd: dict[str, torch.Tensor], out_dir: Path, metadata: dict[str, str]) -> None:
    sd = {k: v.contiguous() for k, v in sd.items()}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    if total <= MAX_SHARD_BYTES:
        save_file(sd, str(out_dir / "model.safetensors"), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if size and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def copy_aux_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer/processor files that exist in src; returns their names."""
    copied = []
    for name in AUX_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
            copied.append(name)
    return copied


def _native_config(cfg: ModelConfig, weights: str | None = None) -> dict:
    d = {"format": NATIVE_MARKER, ("janusflow_config" if isinstance(cfg, JanusFlowConfig) else "janus_config"): cfg.to_dict()}
    if weights is not None:
        d[WEIGHTS_KEY] = weights
    return d


def write_sharded_model_dir(path: str | Path, cfg: ModelConfig, weights: str, aux_from: str | Path | None = None) -> Path:
    """A native model directory without weights: config.json naming where they are (`weights`:
    checkpoint/sharded.py's FROM_DEEPSPEED / FROM_EMA) and the tokenizer files. Written into a
    checkpoint's temporary directory (the checkpoint's rename makes it visible)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    (path / "config.json").write_text(json.dumps(_native_config(cfg, weights), indent=2) + "\n")
    if aux_from is not None:
        copy_aux_files(aux_from, path)
    return path


def write_checkpoint(
    path: str | Path,
    cfg: ModelConfig,
    native_sd: dict[str, torch.Tensor],
    fmt: str = "native",
    aux_from: str | Path | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp dir + rename). Returns the path."""
    path = Path(path)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    flow = isinstance(cfg, JanusFlowConfig)
    if flow and fmt == "hf":
        raise CheckpointError("JanusFlow has no transformers (hf) layout; use --dst-format deepseek (the release layout) or native")
    external = family_keys(cfg).from_native(native_sd, cfg, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if fmt == "native":
            (tmp / "config.json").write_text(json.dumps(_native_config(cfg), indent=2) + "\n")
            _save_safetensors(external, tmp, {"format": "pt"})
        elif flow:  # the JanusFlow release layout, with safetensors weights
            (tmp / "config.json").write_text(json.dumps(flow_formats.config_to_release(cfg), indent=2) + "\n")
            _save_safetensors(external, tmp, {"format": "pt"})
        elif fmt == "hf":
            from transformers import JanusConfig as HFJanusConfig

            if aux_from is not None:
                copy_aux_files(aux_from, tmp)
            try:  # transformers' processor files in place of DeepSeek's (checkpoint/processor.py)
                write_hf_processor(tmp, cfg)
                if cfg.image_token_id is None:  # a release's config does not name it; its tokenizer does
                    cfg = dataclasses.replace(cfg, image_token_id=image_token_id(tmp))
                ids = token_ids(tmp)
            except ProcessorFilesError as e:
                raise CheckpointError(f"{aux_from}: {e}") from None
            hf_cfg = config_formats.config_to_hf(cfg)
            # The tokenizer's special ids, not transformers' Llama defaults (bos 1, eos 2).
            hf_cfg["text_config"].update({k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids})
            HFJanusConfig(**hf_cfg).save_pretrained(str(tmp))
            write_generation_config(tmp, ids)
            _save_safetensors(external, tmp, {"format": "pt"})
        else:  # deepseek: only for building test fixtures in the original layout
            (tmp / "config.json").write_text(json.dumps(config_formats.config_to_deepseek(cfg), indent=2) + "\n")
            torch.save({k: v.contiguous() for k, v in external.items()}, tmp / "pytorch_model.bin")
        if aux_from is not None and fmt != "hf":
            copy_aux_files(aux_from, tmp)
        # mkdtemp makes a private directory; give the result normal permissions.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
            _fsync(f)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync(f: Path) -> None:
    with open(f, "rb") as fh:
        os.fsync(fh.fileno())


def load_state_into(model: torch.nn.Module, native_sd: dict[str, torch.Tensor]) -> None:
    """Strictly load a validated native state dict, keeping dtype/device of the model. Only a
    JanusFlow model's training-only parts may be absent (a release lacks them); they keep the
    model's current values."""
    cfg: ModelConfig = model.config
    sd = dict(native_sd)
    if cfg.llm.tie_word_embeddings:
        sd["lm_head.weight"] = sd["llm.embed_tokens.weight"]
    result = model.load_state_dict(sd, strict=False)
    allowed = FLOW_TRAINING_ONLY if isinstance(cfg, JanusFlowConfig) else ()
    missing = [k for k in result.missing_keys if k.split(".")[0] not in allowed]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")


def load_pretrained(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    fmt: str | None = None,
    overrides: dict | None = None,
):
    """A ready `JanusModel` or `JanusFlowModel` from any supported checkpoint directory (format
    and family auto-detected).

    `overrides` replaces runtime-only fields of the stored config (attention backend,
    activation checkpointing); architecture fields must match the weights. A JanusFlow release
    has no REPA projector (training only): it gets a fresh initialisation.
    """
    from janus_train.models.janus.config import apply_overrides
    from janus_train.models.janus.model import JanusModel
    from janus_train.models.janusflow.model import JanusFlowModel

    cfg, sd = read_checkpoint(path, fmt)
    flow = isinstance(cfg, JanusFlowConfig)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides) if flow else apply_overrides(cfg, overrides)
    with torch.device("meta"):
        model = JanusFlowModel(cfg) if flow else JanusModel(cfg)
    model = model.to_empty(device=device)
    if flow:
        model.init_training_only()
    if dtype is not None:
        model = model.to(dtype)
    load_state_into(model, sd)
    return model.eval()


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (a transformers fast tokenizer)."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file() and not (Path(path) / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path))


# ---- tokenizer checkpoints (tools/train_tokenizer.py) ---------------------------------------------

TOKENIZER_MARKER = "janus_train_tokenizer"


def write_dir_atomically(path: str | Path, fill, extra_files: dict[str, bytes] | None) -> Path:
    """`fill(tmp)` writes a directory's content into a temporary sibling, the extra files are
    added, and the result replaces `path` by a rename (a crash leaves no half-written `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        tmp.chmod(0o755)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_tokenizer_checkpoint(path: str | Path, kind: str, config: dict, image_size: int, state_dict: dict[str, torch.Tensor],
                               extra_files: dict[str, bytes] | None = None, info: dict | None = None) -> Path:
    """A trained image tokenizer: config.json {"format", "kind", "image_size", "config", "info"} +
    model.safetensors (the tokenizer module's own keys), written atomically."""

    def fill(tmp: Path) -> None:
        meta = {"format": TOKENIZER_MARKER, "kind": kind, "image_size": image_size, "config": config, "info": info or {}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return write_dir_atomically(path, fill, extra_files)


def write_vae_checkpoint(path: str | Path, vae: torch.nn.Module, extra_files: dict[str, bytes] | None = None) -> Path:
    """A trained diffusers `AutoencoderKL` in diffusers' own layout (`AutoencoderKL.from_pretrained`
    loads it, as it loads the SDXL-VAE), plus our report files, written atomically."""
    return write_dir_atomically(path, lambda tmp: vae.save_pretrained(str(tmp), safe_serialization=True), extra_files)


def read_tokenizer_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, state dict) of a tokenizer checkpoint; CheckpointError naming the file."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json, not a tokenizer checkpoint")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != TOKENIZER_MARKER:
        raise CheckpointError(f"{cfg_path}: not a tokenizer checkpoint (written by python -m janus_train.tools.train_tokenizer)")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: no model.safetensors")
    return meta, load_weight_file(weights)
