"""LoRA checkpoints of a `finetune.mode=lora` run: merging their adapters into whole weights, and
exporting them as a peft adapter directory for transformers' `JanusForConditionalGeneration`.

A LoRA run's `checkpoints/step_XXXXXXXX/model/` holds what peft's `save_pretrained` writes for
our model (our module names, e.g. `llm.layers.0.attn.q_proj`):

    adapter_config.json          peft's LoraConfig (target_modules, modules_to_save, r, alpha, ...)
    adapter_model.safetensors    base_model.model.<our module>.lora_A.weight / .lora_B.weight, and
                                 base_model.model.<our parameter> of each modules_to_save module
    base.json                    {"path": "<base checkpoint dir>", "format": "hf|deepseek|native|auto"}
    tokenizer files

Everything LoRA-specific is done by peft itself: the adapter is loaded with peft onto our model
built from the base, and merged with `merge_and_unload` (no LoRA arithmetic of our own). For the
peft export, module and parameter names are renamed through the state-dict table that converts
our native names to transformers' (`models/janus/keys.py`), so there is no second name table.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from janus_train.checkpoint.io import (
    CheckpointError,
    ModelConfig,
    family_keys,
    load_state_into,
    load_weight_file,
    read_checkpoint,
    read_config,
    write_dir_atomically,
)
from janus_train.models.janusflow.config import JanusFlowConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "base.json"
PEFT_PREFIX = "base_model.model."
# peft's key of an adapter tensor: <prefix><module>.<lora part>[.<parameter>]
_LORA_KEY = re.compile(r"(?P<module>.+?)\.(?P<part>lora_[A-Za-z_]+)(?P<rest>\..+)?")
HF_AUTO_MAPPING = {"base_model_class": "JanusForConditionalGeneration", "parent_library": "transformers.models.janus.modeling_janus"}


def is_lora_checkpoint(model_dir: str | Path) -> bool:
    """Whether a training checkpoint's model/ directory holds LoRA adapters (not whole weights)."""
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def read_base(model_dir: str | Path) -> tuple[Path, str | None]:
    """(base checkpoint directory, its format or None for auto) from a LoRA checkpoint's base.json."""
    f = Path(model_dir) / BASE_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; a LoRA checkpoint names its base checkpoint there")
    try:
        d = json.loads(f.read_text())
        path, fmt = Path(d["path"]), d.get("format", "auto")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: not a valid base.json ({type(e).__name__}: {e}); expected {{\"path\": ..., \"format\": ...}}") from None
    if not path.is_absolute():
        path = (Path(model_dir) / path).resolve()
    if not path.is_dir():
        raise CheckpointError(f"{f}: base checkpoint {path} does not exist (the adapters need the weights they were trained on)")
    if fmt not in ("auto", "hf", "deepseek", "native"):
        raise CheckpointError(f"{f}: format {fmt!r} must be hf, deepseek, native or auto")
    return path, None if fmt == "auto" else fmt


def read_lora_config(model_dir: str | Path):
    """peft's LoraConfig of a LoRA checkpoint."""
    from peft import LoraConfig, PeftConfig

    try:
        cfg = PeftConfig.from_pretrained(str(model_dir))
    except (ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"{Path(model_dir) / ADAPTER_CONFIG}: not a peft adapter config ({_first_line(e)})") from None
    if not isinstance(cfg, LoraConfig):
        raise CheckpointError(f"{Path(model_dir) / ADAPTER_CONFIG}: peft_type {cfg.peft_type} is not LORA")
    return cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _build(cfg: ModelConfig, device: str | torch.device) -> torch.nn.Module:
    from janus_train.models.families import family_of_config

    with torch.device("meta"):
        model = family_of_config(cfg).build(cfg)
    if str(device) != "meta":
        model = model.to_empty(device=device)
        if isinstance(cfg, JanusFlowConfig):
            model.init_training_only()
    return model


def _with_adapter(model: torch.nn.Module, model_dir: Path, lora_cfg, weights: dict[str, torch.Tensor]):
    """peft's wrapper of `model` with the checkpoint's adapter loaded; CheckpointError naming the
    checkpoint and the key when the adapter does not fit the model."""
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict

    where = model_dir / ADAPTER_WEIGHTS
    try:
        peft_model = PeftModel(model, lora_cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{model_dir / ADAPTER_CONFIG}: does not fit the base model ({_first_line(e)})") from None
    try:
        with warnings.catch_warnings():  # on a meta model (export) loading checks names and shapes only
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as e:  # size mismatch for <key>: ...
        msg = " ".join(line.strip() for line in str(e).splitlines()[1:3]) or _first_line(e)
        raise CheckpointError(f"{where}: adapter for another model: {msg}") from None
    if result.unexpected_keys:
        raise CheckpointError(f"{where}: adapter for another model: {len(result.unexpected_keys)} tensor(s) fit no module, e.g. {result.unexpected_keys[:3]}")
    own = {k for k, _ in peft_model.named_parameters() if ".lora_" in k or ".modules_to_save." in k}
    missing = sorted(k for k in result.missing_keys if k in own)
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} adapter tensor(s), e.g. {missing[:3]}")
    return peft_model


def _modules_to_save(model: torch.nn.Module, lora_cfg) -> list[str]:
    """Our modules peft wraps as modules_to_save (its own rule: a module name ending in an entry)."""
    wanted = list(lora_cfg.modules_to_save or [])
    return [name for name, _ in model.named_modules() if name and any(name.endswith(t) for t in wanted)]


def read_lora_checkpoint(model_dir: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, native state dict) of a LoRA checkpoint: the base's weights with the adapters
    merged in by peft (`merge_and_unload`, computed in fp32), floating tensors in `dtype`, or
    (None) each in the base's dtype (modules_to_save tensors the base lacks: the base's
    floating dtype)."""
    model_dir = Path(model_dir)
    base, fmt = read_base(model_dir)
    lora_cfg = read_lora_config(model_dir)
    cfg, base_sd = read_checkpoint(base, fmt)
    weights = load_weight_file(model_dir / ADAPTER_WEIGHTS)
    model = _build(cfg, "cpu").float()
    load_state_into(model, base_sd)
    saved = _modules_to_save(model, lora_cfg)
    peft_model = _with_adapter(model, model_dir, lora_cfg, weights)
    merged = peft_model.merge_and_unload().state_dict()
    keys = set(base_sd) | {k for k in merged if any(k.startswith(m + ".") for m in saved)}
    float_dtype = next((v.dtype for v in base_sd.values() if v.is_floating_point()), torch.float32)
    out = {}
    for k in sorted(keys):
        t = merged[k].detach()
        if dtype is not None and t.is_floating_point():
            to = dtype
        else:
            to = base_sd[k].dtype if k in base_sd else (float_dtype if t.is_floating_point() else t.dtype)
        out[k] = t.to(to).contiguous()
    return cfg, out


# ---- the peft export for transformers ------------------------------------------------------------


def _map_key(table, native_key: str):
    try:
        return table.map_key(native_key, "hf")
    except KeyError as e:
        raise CheckpointError(f"{e.args[0]}: transformers has no such tensor; no peft export") from None


def hf_module_name(table, native_module: str, params: list[str], hf_keys: set[str]) -> str:
    """transformers' name of our module `native_module` (whose parameters, relative to it, are
    `params`), through the state-dict table: the module holding exactly the mapped parameters
    (a leaf module's under their own names: weight -> weight). CheckpointError when the table
    maps it onto slices of fused tensors or onto parts of several modules."""
    mapped = []
    for p in params:
        ref = _map_key(table, f"{native_module}.{p}")
        if ref.chunk is not None or ref.leading_one:
            raise CheckpointError(f"module {native_module!r}: its transformers weight is not a separate tensor ({ref.key}); no peft export")
        mapped.append(ref.key)
    parents = [k.split(".")[:-1] for k in mapped]
    prefix: list[str] = []
    for cols in zip(*parents):
        if len(set(cols)) > 1:
            break
        prefix.append(cols[0])
    name = ".".join(prefix)
    leaf_ok = all(m == f"{name}.{p}" for m, p in zip(mapped, params) if "." not in p)
    if not name or not leaf_ok or {k for k in hf_keys if k.startswith(name + ".")} != set(mapped):
        raise CheckpointError(f"module {native_module!r}: no single transformers module holds exactly its parameters {mapped[:3]}")
    return name


def export_peft_adapter(ckpt_model_dir: str | Path, out: str | Path, base: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a LoRA checkpoint's adapter as a peft adapter directory for transformers'
    `JanusForConditionalGeneration` (our hf export of the base): adapter_config.json with
    transformers' module names (target_modules: the exact modules the adapter holds;
    modules_to_save; rank/alpha patterns resolved per module), adapter_model.safetensors with
    keys renamed the same way, base_model_name_or_path = `base` or the base checkpoint when it
    is an hf one. JanusFlow (no transformers class) is refused."""
    from safetensors.torch import save_file

    model_dir = Path(ckpt_model_dir)
    if not is_lora_checkpoint(model_dir):
        raise CheckpointError(f"{model_dir}: no {ADAPTER_CONFIG}: --dst-format peft exports the adapters of a LoRA run (finetune.mode=lora); "
                              "export whole weights with --dst-format hf|native")
    base_dir, fmt = read_base(model_dir)
    cfg = read_config(base_dir, fmt)
    if isinstance(cfg, JanusFlowConfig):
        raise CheckpointError("JanusFlow has no transformers model class, so a peft adapter for transformers cannot be written; "
                              "merge the adapters instead (--dst-format native or deepseek)")
    lora_cfg = read_lora_config(model_dir)
    if lora_cfg.target_parameters or lora_cfg.trainable_token_indices:
        raise CheckpointError(f"{model_dir / ADAPTER_CONFIG}: target_parameters / trainable_token_indices are not exported to transformers' names")
    weights = load_weight_file(model_dir / ADAPTER_WEIGHTS)
    # Which modules the adapter holds, checked by peft itself on our model (meta: no memory).
    model = _build(cfg, "meta")
    saved = _modules_to_save(model, lora_cfg)
    peft_model = _with_adapter(model, model_dir, lora_cfg, weights)
    base_name = _base_name(base, base_dir, fmt, cfg)
    modules = dict(peft_model.base_model.model.named_modules())
    table = family_keys(cfg).TABLE
    hf_keys = {ref.key for ref in table.key_map(family_keys(cfg).native_shapes(cfg), "hf").values()}

    def hf_name(m: str) -> str:
        own = [n for n, _ in modules[m].named_parameters() if ".lora_" not in f".{n}" and "modules_to_save" not in n]
        own = [n.removeprefix("base_layer.").removeprefix("original_module.") for n in own]
        return hf_module_name(table, m, own, hf_keys)

    renamed: dict[str, torch.Tensor] = {}
    targets: dict[str, str] = {}  # our LoRA module -> transformers'
    for key, t in weights.items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{model_dir / ADAPTER_WEIGHTS}: key {key!r} does not start with {PEFT_PREFIX!r}")
        rest = key[len(PEFT_PREFIX):]
        m = _LORA_KEY.fullmatch(rest)
        if m:
            mod = m["module"]
            if mod not in targets:
                targets[mod] = hf_name(mod)
            new = targets[mod] + rest[len(mod):]
        else:  # a parameter of a modules_to_save module: the table maps it directly
            ref = _map_key(table, rest)
            if ref.chunk is not None or ref.leading_one:
                raise CheckpointError(f"{rest!r}: its transformers tensor {ref.key} is fused or reshaped; no peft export")
            new = ref.key
        renamed[PEFT_PREFIX + new] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    hf_cfg = _hf_lora_config(lora_cfg, targets, {m: hf_name(m) for m in saved}, base_name)

    def fill(tmp: Path) -> None:
        hf_cfg.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in renamed.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return write_dir_atomically(out, fill, None)


def _hf_lora_config(lora_cfg, targets: dict[str, str], saved: dict[str, str], base_name: str):
    """The LoraConfig for transformers' names: the same hyper-parameters, target_modules the
    exact modules the adapter holds, each module's rank and alpha as peft resolved them for ours."""
    import copy

    from peft.utils.other import get_pattern_key

    if not targets:
        raise CheckpointError("the adapter holds no LoRA tensors; nothing to export")
    rank, alpha = {}, {}
    for ours, theirs in targets.items():
        r = lora_cfg.rank_pattern.get(get_pattern_key(lora_cfg.rank_pattern.keys(), ours), lora_cfg.r)
        a = lora_cfg.alpha_pattern.get(get_pattern_key(lora_cfg.alpha_pattern.keys(), ours), lora_cfg.lora_alpha)
        if r != lora_cfg.r:
            rank[re.escape(theirs)] = r
        if a != lora_cfg.lora_alpha:
            alpha[re.escape(theirs)] = a
    out = copy.deepcopy(lora_cfg)
    out.target_modules = sorted(targets.values())
    out.modules_to_save = sorted(set(saved.values())) or None
    out.rank_pattern, out.alpha_pattern = rank, alpha
    out.layers_to_transform = None
    out.layers_pattern = None
    out.exclude_modules = None
    out.base_model_name_or_path = base_name
    out.auto_mapping = dict(HF_AUTO_MAPPING)
    out.inference_mode = True
    return out


def _base_name(base: str | None, base_dir: Path, fmt: str | None, cfg: ModelConfig) -> str:
    """base_model_name_or_path: --base (a local hf checkpoint is checked against the adapter's
    base), else the base itself when it is an hf checkpoint."""
    from janus_train.checkpoint.io import detect_format

    if base is None:
        if (fmt or detect_format(base_dir)) == "hf":
            return str(base_dir)
        raise CheckpointError(
            f"the adapters' base {base_dir} is not an hf checkpoint; transformers loads the adapter onto an hf one: "
            f"python -m janus_train.convert --src {base_dir} --src-format {fmt or 'auto'} --dst BASE_HF --dst-format hf, then pass --base BASE_HF"
        )
    if Path(base).is_dir():
        other = read_config(base, "hf") if (Path(base) / "config.json").is_file() else None
        if other is None:
            raise CheckpointError(f"--base {base}: no config.json (give our hf export of {base_dir})")
        keys = family_keys(cfg)
        if keys.native_shapes(other) != keys.native_shapes(cfg):
            raise CheckpointError(f"--base {base}: a different model than the adapters' base {base_dir} (parameter shapes differ)")
    return str(base)
