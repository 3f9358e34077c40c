"""The training config: Hydra composes `recipes/`, a typed schema checks it once.

    cfg = load_config(["+recipe=tiny_demo", "parallel.zero_stage=3"])   # Hydra composition
    run = validate_config(cfg, dp_size=2)                              # -> RunConfig (typed)

Composition uses Hydra's compose API (not @hydra.main) so the entry point controls argv (the
DeepSpeed launcher appends --local_rank), working directories and logging. The schema below
(pydantic models, `extra="forbid"` everywhere) defines every key's type and range; the values
and their documentation live in `recipes/config.yaml` and the recipes. A problem becomes one
`ConfigError(key, message)`, which the entry point prints as `config error: <key>: <message>`
(exit 2) before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from janus_train.contracts.batch import TASKS
from janus_train.contracts.errors import ConfigError, from_validation_error, unknown_key
from janus_train.data.config import DataSettings, ImageConfig, Ratio, Source
from janus_train.data.loader import check_source
from janus_train.eval.config import EvalData, EvalSettings
from janus_train.models.attention import ATTENTION_BACKENDS
from janus_train.models.families import ALL_PRESETS, FAMILIES, family_of_preset
from janus_train.models.llm import RECOMPUTE_MODES

__all__ = ["ConfigError", "RunConfig", "StageSettings", "load_config", "resolved_yaml", "validate_config"]

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
STAGE_NAMES = ("stage1", "stage2", "stage3")

Int = Annotated[int, Strict()]
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def _trainable(names: list[str]) -> list[str]:
    # A component of some family here; RunConfig checks it against the preset's family.
    if not names:
        raise ValueError("no trainable component")
    known = {c for f in FAMILIES for c in f.components}
    for name in names:
        if name not in known:
            raise ValueError(f"unknown component {name!r}; choose from {sorted(known)}")
    return names


def _preset(name: str) -> str:
    if name not in ALL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(ALL_PRESETS)}")
    return name


def _tasks(sources: dict[str, list]) -> dict[str, list]:
    bad = sorted(set(sources) - set(TASKS))
    if bad:
        raise ValueError(f"unknown task(s) {bad}; tasks are {list(TASKS)}")
    return sources


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- the schema (documentation of every key: recipes/config.yaml) ---------------------------


class StageConfig(_Section):
    enabled: bool
    trainable: Annotated[list[str], AfterValidator(_trainable)]
    lr: PositiveFloat
    warmup_steps: NonNegativeInt
    decay: Literal["constant", "linear", "cosine"]
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)]
    steps: NonNegativeInt
    global_batch: PositiveInt
    ratio: Ratio
    ratio_phases: list[tuple[PositiveInt, Ratio]] = []
    sources: Annotated[dict[str, list[Source]], AfterValidator(_tasks)] = {}


class StagesConfig(_Section):
    stage1: StageConfig
    stage2: StageConfig
    stage3: StageConfig


class OptimizerConfig(_Section):
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]]
    eps: PositiveFloat
    weight_decay: NonNegativeFloat


class LossWeights(_Section):
    und: NonNegativeFloat
    text: NonNegativeFloat
    gen: NonNegativeFloat


class TrainConfig(_Section):
    micro_batch_rows: PositiveInt
    max_bad_steps: PositiveInt
    optimizer: OptimizerConfig
    grad_clip: NonNegativeFloat
    ema_decay: Annotated[float, Field(ge=0, lt=1)]  # 0: no average of the weights (training/ema.py)
    loss_weights: LossWeights
    stages: StagesConfig


class CheckpointConfig(_Section):
    every_steps: PositiveInt
    keep_last: PositiveInt
    export_hf: bool


class WandbConfig(_Section):
    enabled: bool
    mode: Literal["offline", "online", "disabled"]
    project: str
    entity: str | None
    name: str | None


class LoggingConfig(_Section):
    every_steps: PositiveInt
    progress: bool
    peak_flops: PositiveFloat | None
    sample_every: NonNegativeInt
    sample_prompts: list[str]
    sample_num: PositiveInt
    sample_cfg: NonNegativeFloat
    sample_seed: Int
    wandb: WandbConfig


class ModelSection(_Section):
    preset: Annotated[str, AfterValidator(_preset)]
    overrides: dict[str, Any]
    init_from: str | None
    attention: Literal[ATTENTION_BACKENDS]  # type: ignore[valid-type]
    recompute: Literal[RECOMPUTE_MODES]  # type: ignore[valid-type]
    recompute_every: PositiveInt
    head_chunk_tokens: PositiveInt | None

    vae: str | None = None  # JanusFlow: the diffusers AutoencoderKL directory (sample grids, evaluation)

    @property
    def family(self):
        return family_of_preset(self.preset)

    def model_config_for(self):
        """The model architecture (JanusConfig or JanusFlowConfig): the preset, its overrides
        and the runtime choices."""
        overrides = dict(self.overrides)
        overrides.update(attention=self.attention, recompute=self.recompute, recompute_every=self.recompute_every)
        return self.family.config(self.preset, overrides)


class DataSection(DataSettings):
    root: str | None = None  # base directory the recipe's relative data paths hang from


class ParallelConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3]
    tp: PositiveInt
    dtype: Literal["auto", "fp32", "bf16"]
    timeout_minutes: PositiveFloat
    cpu_threads: PositiveInt | None
    nodes: PositiveInt
    gpus_per_node: PositiveInt


class EvalSection(EvalSettings):
    """Evaluation during training: `EvalSettings` plus when and on what."""

    every_steps: NonNegativeInt = 0  # evaluate every N global steps (0: not periodically)
    at_stage_end: bool = True  # and after the last step of every stage
    data: EvalData | None = None  # the held-out sets; None: no evaluation

    @model_validator(mode="before")
    @classmethod
    def _data(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("data"), dict):
            v = dict(v, data=EvalData.from_dict(v["data"]))
        return v


class DemoAssetsConfig(_Section):
    build: bool
    num_samples: PositiveInt
    held_out: NonNegativeInt
    tokenizer_steps: PositiveInt
    max_shapes: Annotated[int, Strict(), Field(ge=1, le=5)]
    min_size: Annotated[float, Field(gt=0, le=0.45)]
    max_size: Annotated[float, Field(gt=0, le=0.45)]
    shapes: list[str]
    noise: Annotated[int, Strict(), Field(ge=0, le=64)]
    max_questions: Annotated[int, Strict(), Field(ge=1, le=6)]
    square: bool
    backgrounds: list[str]
    colors: list[str]


class LoraSection(_Section):
    rank: PositiveInt
    alpha: PositiveFloat
    dropout: Annotated[float, Field(ge=0, lt=1)]
    target_modules: Annotated[list[NonEmptyStr], Field(min_length=1)]
    modules_to_save: list[NonEmptyStr]

    def settings(self):
        from janus_train.models.lora import LoraSettings

        return LoraSettings(self.rank, self.alpha, self.dropout, tuple(self.target_modules), tuple(self.modules_to_save))


class FinetuneConfig(_Section):
    mode: Literal["full", "lora"]
    lora: LoraSection

    @property
    def is_lora(self) -> bool:
        return self.mode == "lora"


class RunConfig(_Section):
    run_dir: NonEmptyStr
    resume: NonEmptyStr
    stage: Literal[1, 2, 3] | None
    seed: NonNegativeInt
    train: TrainConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    model: ModelSection
    data: DataSection
    parallel: ParallelConfig
    eval: EvalSection
    demo_assets: DemoAssetsConfig
    finetune: FinetuneConfig

    def enabled_stages(self) -> list["StageSettings"]:
        out = []
        for i, name in enumerate(STAGE_NAMES, start=1):
            s: StageConfig = getattr(self.train.stages, name)
            if s.enabled:
                out.append(StageSettings(i, name, list(s.trainable), s.lr, s.warmup_steps, s.decay, s.min_lr_ratio, s.steps, s.global_batch, s.ratio,
                                         {t: [src.model_dump() for src in v] for t, v in s.sources.items()},
                                         [(int(u), tuple(r)) for u, r in s.ratio_phases]))
        return out


@dataclass(frozen=True)
class StageSettings:
    """One enabled stage of the schedule, with its position (1..3)."""

    index: int
    name: str
    trainable: list[str]
    lr: float
    warmup_steps: int
    decay: str
    min_lr_ratio: float
    steps: int
    global_batch: int
    ratio: tuple[float, float, float]
    sources: dict[str, list[dict[str, Any]]]
    ratio_phases: list[tuple[int, tuple[float, float, float]]] = field(default_factory=list)  # [(until_step, ratio)]


# ---- composition ----------------------------------------------------------------------------


def _groups(config_dir: Path) -> dict[str, list[str]]:
    """Config groups (sub-directories of recipes/) and their options."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in config_dir.iterdir() if d.is_dir()}


def load_config(overrides: list[str], config_dir: str | Path | None = None) -> DictConfig:
    """Compose recipes/config.yaml with Hydra overrides; raises ConfigError on bad overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir or RECIPES_DIR).resolve()
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as e:
        raise ConfigError("overrides", str(e).strip().splitlines()[0]) from None
    groups = _groups(config_dir)
    for o in parsed:
        if o.key_or_group in groups and not o.is_delete():
            value = o.value()
            if isinstance(value, str) and value not in groups[o.key_or_group]:
                raise ConfigError(o.key_or_group, f"no {o.key_or_group} named {value!r}; available: {groups[o.key_or_group]}")

    def compose_with(ovs: list[str]) -> DictConfig:
        GlobalHydra.instance().clear()
        # The data keys' defaults are the schema's (one definition): recipes/data/*.yaml
        # start from this node and set only what they change.
        ConfigStore.instance().store(group="data", name="schema", node=DataSection().model_dump())
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name="config", overrides=ovs)

    try:
        return compose_with(list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise _explain(e, parsed, groups, compose_with) from None


def _explain(error: Exception, parsed: list, groups: dict[str, list[str]], compose_with) -> ConfigError:
    """Which override Hydra refused, and why: replay the value overrides on the config the
    group choices alone compose to."""
    base = compose_with([o.input_line for o in parsed if o.key_or_group in groups])
    missing = object()
    added: set[str] = set()
    for o in parsed:
        key = o.key_or_group
        if key in groups:
            continue
        exists = key in added or OmegaConf.select(base, key, default=missing, throw_on_missing=False) is not missing
        if o.is_delete() and not exists:
            return ConfigError(key, "cannot delete: no such key")
        if o.is_add() and exists and not isinstance(o.value(), (dict, list)):
            return ConfigError(key, f"already set; write {o.input_line[1:]!r} (without '+') to change it")
        if not (o.is_add() or o.is_force_add() or o.is_delete()) and not exists:
            return ConfigError(key, unknown_key())
        if o.is_add() or o.is_force_add():
            added.add(key)
    first = str(error).strip().splitlines()
    return ConfigError("overrides", first[0] if first else type(error).__name__)


def resolved_yaml(cfg: DictConfig) -> str:
    """The config as YAML with interpolations resolved where possible (??? stays visible)."""
    return OmegaConf.to_yaml(cfg, resolve=not OmegaConf.missing_keys(cfg))


# ---- validation -----------------------------------------------------------------------------

# What to say about a key a recipe leaves open (???).
_MISSING_HINTS = {
    "model.init_from": "must be set: a checkpoint directory to start from (or null for random init)",
    "model.vae": "must be set: the diffusers AutoencoderKL directory the gen shards were encoded with (the SDXL-VAE for JanusFlow-1.3B)",
}


def validate_config(cfg: DictConfig, dp_size: int | None = None, check_paths: bool = True, complete: bool = True) -> RunConfig:
    """Check everything that can be checked before training; returns the typed config.

    `dp_size` (data-parallel ranks) enables the batch divisibility check, `check_paths` the
    existence of checkpoint and data directories. `complete=False` checks a config for tools
    that plan rather than train (the memory plan): keys a recipe leaves open (???) and data
    sources may be missing.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing and complete:
        raise ConfigError(missing[0], _MISSING_HINTS.get(missing[0], "must be set (the recipe leaves it open: ???)"))
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as e:  # an interpolation that does not resolve
        raise ConfigError(getattr(e, "full_key", None) or "config", str(e).strip().splitlines()[0]) from None
    for key in missing:  # only when not required: an open key reads as unset
        node = container
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = None
    try:
        run = RunConfig.model_validate(container)
    except ValidationError as e:
        raise from_validation_error(e) from None
    _check_consistency(run, dp_size, check_paths, complete)
    return run


def _check_lora(run: RunConfig, model_cfg, complete: bool) -> None:
    """finetune.mode=lora: tensor parallelism off, a base to adapt (not checked for planning
    tools: `complete=False`), targets that exist."""
    import torch

    from janus_train.models.lora import LoraSettingsError, check_targets

    if run.parallel.tp > 1:
        raise ConfigError("parallel.tp", f"{run.parallel.tp} with finetune.mode=lora: LoRA runs with parallel.tp=1 only (peft's "
                          "adapters wrap torch layers, not megatron-core's tensor-parallel ones); spread the frozen base "
                          "with parallel.zero_stage=3 instead")
    if run.train.ema_decay:
        raise ConfigError("train.ema_decay", f"{run.train.ema_decay} with finetune.mode=lora: the weight average is kept for full "
                          "training only (a LoRA checkpoint holds adapters, not whole weights to average); set it to 0")
    if run.model.init_from is None and not run.demo_assets.build and complete:
        raise ConfigError("model.init_from", "finetune.mode=lora adapts trained weights: set model.init_from to the base "
                          "checkpoint directory")
    family = run.model.family
    with torch.device("meta"):
        skeleton = family.build(model_cfg)
    try:
        check_targets(skeleton, run.finetune.lora.settings(), family.components, family.always_frozen)
    except LoraSettingsError as e:
        raise ConfigError(f"finetune.lora.{e.key}", e.message) from None


def _check_consistency(run: RunConfig, dp_size: int | None, check_paths: bool, complete: bool) -> None:
    """The checks that involve several keys or the file system."""
    stages = run.enabled_stages()
    if not stages:
        raise ConfigError("train.stages", "every stage is disabled")
    if run.stage is not None and run.stage not in [s.index for s in stages]:
        raise ConfigError("stage", f"stage {run.stage} is disabled in train.stages")
    if check_paths and run.resume not in ("auto", "none") and not Path(run.resume).exists():
        raise ConfigError("resume", f"must be auto, none or an existing checkpoint path; {run.resume!r} does not exist")
    init = run.model.init_from
    if check_paths and init is not None and not Path(init).exists() and not run.demo_assets.build:
        raise ConfigError("model.init_from", f"checkpoint directory {init!r} does not exist")
    try:
        model_cfg = run.model.model_config_for()
    except ValueError as e:
        raise ConfigError("model.overrides", str(e)) from None
    family = run.model.family
    for s in stages:
        try:
            family.check_trainable(s.trainable)
        except ValueError as e:
            raise ConfigError(f"train.stages.{s.name}.trainable", f"{e} (model.preset={run.model.preset} is a {family.name} model)") from None
    if run.finetune.is_lora:
        _check_lora(run, model_cfg, complete)
    image = ImageConfig.from_model(model_cfg)
    vae = run.model.vae
    if family.gen_kind == "flow":
        if run.logging.sample_every and vae is None and complete:
            raise ConfigError("model.vae", "JanusFlow sample grids decode latents with a VAE: set model.vae (a diffusers "
                              "AutoencoderKL directory) or logging.sample_every=0")
        ev = run.eval
        if vae is None and ev.data is not None and "gen" in ev.tasks and (ev.data.gen or ev.data.geneval):
            raise ConfigError("model.vae", "JanusFlow's gen evaluation decodes latents with a VAE: set model.vae (a diffusers "
                              "AutoencoderKL directory) or leave gen out of eval.tasks")
        if check_paths and vae is not None and not (Path(vae) / "config.json").is_file():
            raise ConfigError("model.vae", f"{vae!r} is not a diffusers AutoencoderKL directory (no config.json)")
    elif vae is not None:
        raise ConfigError("model.vae", f"only JanusFlow uses a VAE; model.preset={run.model.preset} is a Janus-Pro model (its VQ is in the checkpoint)")
    for s in stages:
        until = [u for u, _ in s.ratio_phases]
        if until != sorted(set(until)):
            raise ConfigError(f"train.stages.{s.name}.ratio_phases", f"until_step values must be strictly ascending, got {until}")
        shares = [max(r[i] for r in [s.ratio] + [p for _, p in s.ratio_phases]) for i in range(len(TASKS))]
        for task, share in zip(TASKS, shares):
            if share <= 0:
                continue
            own = task in s.sources
            key = f"train.stages.{s.name}.sources.{task}" if own else f"data.{task}"
            srcs = s.sources[task] if own else [src.model_dump() for src in getattr(run.data, task)]
            if not srcs and complete:
                raise ConfigError(key, f"{s.name} gives task {task} a ratio share of {share:g} but lists no sources")
            for i, src in enumerate(srcs):
                if check_paths:  # in seconds, not after the model loads: present, has samples, pre-tokenised
                    check_source(src["path"], task, image, f"{key}[{i}].path")
    if run.eval.data is not None and check_paths:
        run.eval.data.check_exists(tuple(run.eval.tasks), key="eval.data")
    if run.eval.scorer is not None:
        from janus_train.eval.scorers import SCORERS

        if run.eval.scorer not in SCORERS:
            raise ConfigError("eval.scorer", f"unknown scorer {run.eval.scorer!r}; scorers are {sorted(SCORERS)}")
    if dp_size is not None:
        unit = dp_size * run.train.micro_batch_rows
        for s in stages:
            if s.global_batch % unit:
                raise ConfigError(
                    f"train.stages.{s.name}.global_batch",
                    f"{s.global_batch} is not divisible by train.micro_batch_rows x data-parallel size = "
                    f"{run.train.micro_batch_rows} x {dp_size} = {unit}",
                )
