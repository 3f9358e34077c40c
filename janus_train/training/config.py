"""The training config: Hydra composition of recipes/ plus validation that names the bad key.

    cfg = load_config(["+recipe=tiny_demo", "parallel.zero_stage=3"])

Composition uses Hydra's compose API (not @hydra.main) so the entry point controls argv
(the DeepSpeed launcher appends --local_rank), working directories and logging.
Everything is checked before any rank trains; `ConfigError` carries the key and the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
STAGE_NAMES = ("stage1", "stage2", "stage3")
TASKS = ("und", "text", "gen")
TRAINABLE = ("llm", "lm_head", "vision", "und_aligner", "gen_embed", "gen_aligner", "gen_head")
# Keys below these paths hold free-form content (lists of sources, dotted model overrides).
FREE_FORM = ("model.overrides", "train.stages.*.sources", "data.und", "data.text", "data.gen", "logging.sample_prompts")


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class StageSettings:
    """One stage of the schedule, resolved and validated."""

    index: int
    name: str
    trainable: list[str]
    lr: float
    warmup_steps: int
    steps: int
    global_batch: int
    ratio: tuple[float, float, float]
    sources: dict[str, list[dict[str, Any]]]


def load_config(overrides: list[str], config_dir: str | Path | None = None) -> DictConfig:
    """Compose recipes/config.yaml with Hydra overrides; raises ConfigError on bad overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = str(Path(config_dir or RECIPES_DIR).resolve())
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e)
        key = _key_from_hydra_error(msg, overrides)
        if "Could not override" in msg or "not in struct" in msg:
            text = "unknown key (check the spelling; see recipes/config.yaml)"
        elif "Could not find" in msg:
            group = key
            options = sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))
            text = f"{_first_line(msg)}; available: {options}"
        else:
            text = _first_line(msg)
        raise ConfigError(key, text) from None
    return cfg


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg


def _key_from_hydra_error(msg: str, overrides: list[str]) -> str:
    m = re.search(r"Could not find '([^']+)'", msg)
    if m:
        return m.group(1).split("/")[0]
    for pat in (r"Could not override '([^']+)'", r"Key '([^']+)' is not in struct", r"Could not append to config. An item is already at '([^']+)'", r"In '([^']+)'"):
        m = re.search(pat, msg)
        if m:
            key = m.group(1)
            for ov in overrides:  # report the full dotted key the user typed
                name = ov.lstrip("+~").split("=", 1)[0]
                if name.endswith(key):
                    return name
            return key
    for ov in overrides:
        if ov.split("=", 1)[0].lstrip("+~") in msg:
            return ov.split("=", 1)[0].lstrip("+~")
    return "config"


def reference_keys() -> set[str]:
    """Every dotted key of the base config: anything else in a composed config is unknown."""
    base = load_config([])
    keys: set[str] = set()
    _collect(OmegaConf.to_container(base, resolve=False), "", keys)
    return keys


def _collect(node: Any, prefix: str, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            out.add(key)
            if not _is_free_form(key):
                _collect(v, key + ".", out)


def _is_free_form(key: str) -> bool:
    for pattern in FREE_FORM:
        if re.fullmatch(pattern.replace(".", r"\.").replace("*", r"[^.]+"), key):
            return True
    return False


def parse_ratio(value: Any, key: str) -> tuple[float, float, float]:
    """'2:3:5', [2, 3, 5] or {und: 2, text: 3, gen: 5} -> (2.0, 3.0, 5.0)."""
    if isinstance(value, str):
        parts = value.split(":")
    elif isinstance(value, (list, tuple, ListConfig)):
        parts = list(value)
    elif isinstance(value, (dict, DictConfig)):
        extra = set(value) - set(TASKS)
        if extra:
            raise ConfigError(key, f"unknown task(s) {sorted(extra)} in ratio {value!r}; tasks are {TASKS}")
        parts = [value.get(t, 0) for t in TASKS]
    else:
        raise ConfigError(key, f"ratio {value!r} must look like 'und:text:gen', e.g. '2:3:5'")
    if len(parts) != 3:
        raise ConfigError(key, f"ratio {value!r} must have three parts und:text:gen, got {len(parts)}")
    try:
        nums = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(key, f"ratio {value!r} must be numbers, e.g. '2:3:5'") from None
    if any(n < 0 or n != n for n in nums):
        raise ConfigError(key, f"ratio {value!r} must be non-negative")
    if sum(nums) == 0:
        raise ConfigError(key, f"ratio {value!r} is all zero: no task would train")
    return nums  # type: ignore[return-value]


def _int(cfg: DictConfig, key: str, minimum: int) -> int:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _num(cfg: DictConfig, key: str, minimum: float, strict: bool = False) -> float:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum or (strict and value == minimum):
        raise ConfigError(key, f"must be a number {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def _choice(cfg: DictConfig, key: str, choices: tuple) -> Any:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ConfigError(key, f"must be one of {list(choices)}, got {value!r}")
    return value


def stage_settings(cfg: DictConfig) -> list[StageSettings]:
    """The enabled stages in order, validated."""
    stages = cfg.train.stages
    extra = set(stages) - set(STAGE_NAMES)
    if extra:
        raise ConfigError(f"train.stages.{sorted(extra)[0]}", f"unknown stage; stages are {list(STAGE_NAMES)}")
    out = []
    for i, name in enumerate(STAGE_NAMES, start=1):
        if name not in stages:
            raise ConfigError(f"train.stages.{name}", "missing")
        s = stages[name]
        base = f"train.stages.{name}"
        if not s.get("enabled", True):
            continue
        trainable = list(s.trainable)
        for comp in trainable:
            if comp == "vq":
                raise ConfigError(f"{base}.trainable", "vq is frozen in every stage (Janus-Pro trains on pre-extracted codes)")
            if comp not in TRAINABLE:
                raise ConfigError(f"{base}.trainable", f"unknown component {comp!r}; choose from {list(TRAINABLE)}")
        if not trainable:
            raise ConfigError(f"{base}.trainable", "no trainable component")
        raw = s.get("sources")
        sources = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw or {})
        bad = set(sources) - set(TASKS)
        if bad:
            raise ConfigError(f"{base}.sources", f"unknown task(s) {sorted(bad)}; tasks are {list(TASKS)}")
        out.append(
            StageSettings(
                index=i,
                name=name,
                trainable=trainable,
                lr=_num(cfg, f"{base}.lr", 0.0, strict=True),
                warmup_steps=_int(cfg, f"{base}.warmup_steps", 0),
                steps=_int(cfg, f"{base}.steps", 0),
                global_batch=_int(cfg, f"{base}.global_batch", 1),
                ratio=parse_ratio(s.ratio, f"{base}.ratio"),
                sources=sources,
            )
        )
    if not out:
        raise ConfigError("train.stages", "every stage is disabled")
    return out


def validate_config(cfg: DictConfig, dp_size: int | None = None, check_paths: bool = True) -> list[StageSettings]:
    """Check everything that can be checked before training; returns the stages to run.

    `dp_size` (data-parallel ranks) enables the batch divisibility check; `check_paths`
    the existence of data directories (the demo builds them first, then checks).
    """
    known = reference_keys()
    flat: set[str] = set()
    _collect(OmegaConf.to_container(cfg, resolve=False), "", flat)
    unknown = sorted(k for k in flat - known if not any(k.startswith(f + ".") for f in known if _is_free_form(f)))
    # Stage sub-keys are known for every stage name.
    unknown = [k for k in unknown if not re.fullmatch(r"train\.stages\.stage[123]\..*", k) or k.split(".")[3] not in _stage_keys()]
    if unknown:
        raise ConfigError(unknown[0], "unknown key (check the spelling; see recipes/config.yaml)")
    for key in ("run_dir", "resume"):
        if OmegaConf.is_missing(cfg, key) or not isinstance(OmegaConf.select(cfg, key), str) or not OmegaConf.select(cfg, key):
            raise ConfigError(key, f"must be a non-empty string, got {OmegaConf.select(cfg, key, throw_on_missing=False)!r}")
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).exists():
        raise ConfigError("resume", f"must be auto, none or an existing checkpoint path; {cfg.resume!r} does not exist")
    if cfg.stage is not None and cfg.stage not in (1, 2, 3):
        raise ConfigError("stage", f"must be 1, 2, 3 or null, got {cfg.stage!r}")
    _int(cfg, "seed", 0)
    _int(cfg, "train.micro_batch_rows", 1)
    _int(cfg, "train.max_bad_steps", 1)
    _num(cfg, "train.grad_clip", 0.0)
    _num(cfg, "train.optimizer.eps", 0.0, strict=True)
    _num(cfg, "train.optimizer.weight_decay", 0.0)
    betas = list(cfg.train.optimizer.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError("train.optimizer.betas", f"must be two numbers in [0, 1), got {betas!r}")
    stages = stage_settings(cfg)
    if cfg.stage is not None and cfg.stage not in [s.index for s in stages]:
        raise ConfigError("stage", f"stage {cfg.stage} is disabled in train.stages")
    _int(cfg, "checkpoint.every_steps", 1)
    _int(cfg, "checkpoint.keep_last", 1)
    _int(cfg, "logging.every_steps", 1)
    _int(cfg, "logging.sample_every", 0)
    _int(cfg, "logging.sample_num", 1)
    _num(cfg, "logging.sample_cfg", 0.0)
    if cfg.logging.peak_flops is not None:
        _num(cfg, "logging.peak_flops", 0.0, strict=True)
    _choice(cfg, "logging.wandb.mode", ("offline", "online", "disabled"))
    _choice(cfg, "parallel.zero_stage", (0, 1, 2, 3))
    _int(cfg, "parallel.tp", 1)
    _choice(cfg, "parallel.dtype", ("auto", "fp32", "bf16"))
    _num(cfg, "parallel.timeout_minutes", 0.0, strict=True)
    _validate_model(cfg)
    _validate_data(cfg, stages, check_paths)
    if dp_size is not None:
        unit = dp_size * cfg.train.micro_batch_rows
        for s in stages:
            if s.global_batch % unit:
                raise ConfigError(
                    f"train.stages.{s.name}.global_batch",
                    f"{s.global_batch} is not divisible by train.micro_batch_rows x data-parallel size = "
                    f"{cfg.train.micro_batch_rows} x {dp_size} = {unit}",
                )
    return stages


def _stage_keys() -> set[str]:
    return {"enabled", "trainable", "lr", "warmup_steps", "steps", "global_batch", "ratio", "sources"}


def _validate_model(cfg: DictConfig) -> None:
    from janus_train.models.janus.config import ATTENTION_BACKENDS, CHECKPOINTING_MODES, PRESETS, JanusConfig

    _choice(cfg, "model.preset", tuple(PRESETS))
    _choice(cfg, "model.attention", ATTENTION_BACKENDS)
    _choice(cfg, "model.activation_checkpointing", CHECKPOINTING_MODES)
    _int(cfg, "model.checkpoint_every", 1)
    if cfg.model.head_chunk_tokens is not None:
        _int(cfg, "model.head_chunk_tokens", 1)
    if OmegaConf.is_missing(cfg.model, "init_from"):
        raise ConfigError("model.init_from", "must be set: a checkpoint directory to start from (or null for random init)")
    init = cfg.model.init_from
    if init is not None and not Path(init).exists() and not cfg.demo_assets.build:
        raise ConfigError("model.init_from", f"checkpoint directory {init!r} does not exist")
    try:
        JanusConfig.from_preset(cfg.model.preset, OmegaConf.to_container(cfg.model.overrides, resolve=True))
    except ValueError as e:
        raise ConfigError("model.overrides", str(e)) from None


def _validate_data(cfg: DictConfig, stages: list[StageSettings], check_paths: bool) -> None:
    _int(cfg, "data.seq_len", 8)
    for s in stages:
        for task, share in zip(TASKS, s.ratio):
            if share <= 0:
                continue
            key = f"train.stages.{s.name}.sources.{task}" if task in s.sources else f"data.{task}"
            srcs = s.sources.get(task) if task in s.sources else OmegaConf.to_container(cfg.data[task], resolve=True)
            if not srcs:
                raise ConfigError(key, f"{s.name} gives task {task} a ratio share of {share:g} but lists no sources")
            for i, src in enumerate(srcs):
                path = src.get("path") if isinstance(src, dict) else src
                if not path:
                    raise ConfigError(f"{key}[{i}]", f"source {src!r} has no path")
                if check_paths and not Path(path).is_dir():
                    raise ConfigError(f"{key}[{i}].path", f"data directory {path!r} does not exist")


def resolved_yaml(cfg: DictConfig) -> str:
    """The config as YAML with interpolations resolved where possible (??? stays visible)."""
    return OmegaConf.to_yaml(cfg, resolve=not _has_missing(cfg))


def _has_missing(cfg: DictConfig) -> bool:
    return bool(OmegaConf.missing_keys(cfg))
