"""LoRA fine-tuning with `peft`: adapters injected into our own model, peft's file format.

    settings = LoraSettings(rank=16, alpha=32, dropout=0.05, target_modules=("llm_attn", "llm_mlp"))
    check_targets(model, settings, components, always_frozen)   # LoraSettingsError(key, message)
    apply_lora(model, settings)                  # inject (peft), freeze the base; in place
    adapter = adapter_state_dict(trainable_sd, settings)   # our names -> peft's saved keys
    load_adapter_state(model, adapter)           # peft's saved keys -> the injected model

The adapters are peft's own layers (`peft.inject_adapter_in_model` with a `LoraConfig`); the
model stays our `JanusModel` / `JanusFlowModel`, so everything that calls it (the step, ZeRO-3's
hooks, recomputation, sampling) is unchanged. `target_modules` are presets (below) and/or
regular expressions over our module names; they become one regex that peft full-matches.

`modules_to_save` (our top-level component names, e.g. `gen_head`) train in full next to the
adapters. peft would wrap them in a `ModulesToSaveWrapper` (a second copy of the module); we
train the component in place instead and write its weights under peft's saved key for a module
to save (`base_model.model.gen_head.fc1.weight`), so the files are what `PeftModel.save_pretrained`
writes for the same values, and `PeftModel.from_pretrained` / `set_peft_model_state_dict` load them.

Saved keys (peft's convention for a `PeftModel` around our model, adapter name dropped):
`base_model.model.<our module path>.lora_A.weight`, `....lora_B.weight`, and
`base_model.model.<component>.<param>` for the modules to save.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name; dropped in the saved keys
PREFIX = "base_model.model."  # a PeftModel's prefix of the wrapped model's keys
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Target presets: regexes over our module names (Janus-Pro; JanusFlow where it has the part).
PRESETS: dict[str, str] = {
    "llm_attn": r"llm\.layers\.\d+\.attn\.(q_proj|k_proj|v_proj|o_proj)",
    "llm_mlp": r"llm\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    "vision": r"vision\.blocks\.\d+\.(attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
    "und_aligner": r"und_aligner\.layers\.\d+",
    "gen_aligner": r"gen_aligner\.layers\.\d+|gen_enc_aligner|gen_dec_aligner",
    "gen_head": r"gen_head\.(fc1|fc2)",
}
# Layer types peft's LoRA adapts (and our models contain).
SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv2d)


class LoraSettingsError(ValueError):
    """A bad LoRA setting: `key` is its name under finetune.lora."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def pattern_of(target: str) -> str:
    """A preset's regex, or the target itself (a regex over our module names)."""
    return PRESETS.get(target, target)


def target_regex(targets: tuple[str, ...] | list[str]) -> str:
    """One regex for peft (`re.fullmatch` against each module name)."""
    return "|".join(f"(?:{pattern_of(t)})" for t in targets)


def lora_config(settings: LoraSettings):
    """peft's LoraConfig of these settings."""
    from peft import LoraConfig

    alpha = settings.alpha
    return LoraConfig(
        r=settings.rank,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=settings.dropout,
        target_modules=target_regex(settings.target_modules),
        modules_to_save=list(settings.modules_to_save) or None,
        bias="none",
    )


def matched_modules(model: nn.Module, target: str) -> list[str]:
    rx = re.compile(pattern_of(target))
    return [name for name, _ in model.named_modules() if name and rx.fullmatch(name)]


def check_targets(model: nn.Module, settings: LoraSettings, components: tuple[str, ...], always_frozen: tuple[str, ...]) -> None:
    """LoraSettingsError for the first bad setting: an unknown component to save, a
    target that matches no module, one that matches a layer peft cannot adapt, or one inside a
    component that is saved in full or never trains. `model` may live on the meta device."""
    for name in settings.modules_to_save:
        if name not in components or name in always_frozen:
            trainable = [c for c in components if c not in always_frozen]
            raise LoraSettingsError("modules_to_save", f"{name!r} is not a trainable component; choose from {trainable}")
    modules = dict(model.named_modules())
    for target in settings.target_modules:
        try:
            re.compile(pattern_of(target))
        except re.error as e:
            raise LoraSettingsError("target_modules", f"{target!r} is neither a preset ({sorted(PRESETS)}) nor a valid regex: {e}") from None
        names = matched_modules(model, target)
        if not names:
            raise LoraSettingsError("target_modules", f"{target!r} matches no module of this model (presets: {sorted(PRESETS)}; "
                             f"a regex must match whole module names such as 'llm.layers.0.attn.q_proj')")
        for name in names:
            if not isinstance(modules[name], SUPPORTED):
                raise LoraSettingsError("target_modules", f"{target!r} matches {name!r}, a {type(modules[name]).__name__}: LoRA adapts "
                                 f"Linear, Embedding and Conv2d layers only")
            top = name.split(".")[0]
            if top in always_frozen:
                raise LoraSettingsError("target_modules", f"{target!r} matches {name!r} in {top}, which never trains")
            if top in settings.modules_to_save:
                raise LoraSettingsError("target_modules", f"{target!r} matches {name!r} in {top}, which modules_to_save trains in full")


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject peft's LoRA layers (in place; torch's RNG draws lora_A), then freeze everything
    but the adapters and the modules to save. Returns the model."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    cfg = lora_config(settings)
    cfg.modules_to_save = None  # trained in place (module docstring), not wrapped
    inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    for comp in settings.modules_to_save:
        getattr(model, comp).requires_grad_(True)
    model.lora_settings = settings
    return model


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def saved_key(name: str) -> str:
    """Our (injected) parameter name -> peft's saved key."""
    return PREFIX + name.replace(f".{ADAPTER}.", ".")


def adapter_state_dict(trainable_sd: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The trainable parameters (our injected names, e.g. from `full_state_dict(...,
    trainable_only=True)`) as peft saves them: adapters and modules to save."""
    out = {}
    for name, t in trainable_sd.items():
        if is_adapter_param(name) or name.split(".")[0] in settings.modules_to_save:
            out[saved_key(name)] = t
    return out


def model_key(key: str, adapter_names: set[str]) -> str:
    """peft's saved key -> our injected parameter name."""
    name = key.removeprefix(PREFIX)
    for part in ("lora_A", "lora_B"):
        tail = f".{part}.weight"
        if name.endswith(tail):
            cand = name[: -len(tail)] + f".{part}.{ADAPTER}.weight"
            if cand in adapter_names:
                return cand
    return name


def load_adapter_state(model: nn.Module, adapter_sd: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter (and modules-to-save) values into an injected model; every trainable
    parameter must be covered and every key used."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    seen = set()
    with torch.no_grad():
        for key, value in adapter_sd.items():
            name = model_key(key, set(params))
            if name not in params:
                raise ValueError(f"adapter key {key!r} fits no parameter of the model")
            p = params[name]
            if p.shape != value.shape:
                raise ValueError(f"adapter key {key!r}: shape {tuple(value.shape)}, the model's {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))
            seen.add(name)
    missing = sorted(trainable - seen)
    if missing:
        raise ValueError(f"the adapter state has no value for {missing[:5]} ({len(missing)} trainable parameters)")


def exact_trainable(model: nn.Module, base_sd: dict[str, torch.Tensor] | None, adapter_sd: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """fp32 values of the trainable parameters (our injected names) as the files hold them: the
    adapter state where given, else the base's modules to save and the freshly drawn adapters.
    The optimizer's masters are set from these (the module may hold them rounded to bf16)."""
    params = dict(model.named_parameters())
    out = {n: p.detach().float().cpu() for n, p in params.items() if p.requires_grad}
    if base_sd is not None:
        out.update({n: base_sd[n] for n in out if n in base_sd})
    if adapter_sd is not None:
        for key, value in adapter_sd.items():
            out[model_key(key, set(params))] = value
    return out


# ---- peft's adapter directory ---------------------------------------------------------------


def write_adapter(out_dir: str | Path, settings: LoraSettings, adapter_sd: dict[str, torch.Tensor], base_model_class: type) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` as `PeftModel.save_pretrained`
    writes them for our model (inference_mode true, auto_mapping naming our model class)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(lora_config(settings))
    cfg.inference_mode = True
    cfg.save_pretrained(str(out_dir), auto_mapping_dict={"base_model_class": base_model_class.__name__,
                                                         "parent_library": base_model_class.__module__})
    save_file({k: v.contiguous() for k, v in adapter_sd.items()}, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / WEIGHTS_FILE).chmod(0o644)


def read_adapter(model_dir: str | Path) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    """(settings, saved adapter state) of an adapter directory written by `write_adapter`."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    d = json.loads((model_dir / CONFIG_FILE).read_text())
    targets = d["target_modules"]
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    settings = LoraSettings(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d["lora_dropout"]),
                            target_modules=targets, modules_to_save=tuple(d.get("modules_to_save") or ()))
    return settings, load_file(str(model_dir / WEIGHTS_FILE))
