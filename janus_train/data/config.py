"""The data configuration: a typed schema (pydantic), loadable from YAML or from a dict (the
training engine fills it from its `data:` section plus each stage's ratio and batch).

Example (YAML):

    und:  [{path: /data/und/shapes, weight: 1.0}]
    text: [{path: /data/text/shapes}]
    gen:
      - {path: /data/gen/real, weight: 1, name: real}
      - {path: /data/gen/synthetic, weight: 1, name: synthetic}
    ratio: [2, 3, 5]       # und:text:gen; or "2:3:5" (quoted!); or {und: 2, text: 3, gen: 5}
    seq_len: 4096
    global_batch: 512      # packed rows per optimizer step, all ranks together
    micro_batch_rows: 1    # rows per micro-batch per rank
    seed: 1234
    tokenizer: /ckpt/janus-pro-1b   # a checkpoint (or tokenizer) directory

`DataSettings` holds what a user sets for a run (the training config's `data:` section);
`DataConfig` adds what the trainer sets per stage (ratio, global batch, data-parallel layout).
Every key and its meaning is listed below and in docs/data.md. A bad value raises a
`ConfigError` naming `data.<key>` and the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator

from janus_train.contracts.batch import TASKS
from janus_train.contracts.errors import ConfigError, from_validation_error
from janus_train.data.mixing import GRANULARITIES

Int = Annotated[int, Strict()]


def parse_ratio(value: Any) -> tuple[float, float, float]:
    """'2:3:5', [2, 3, 5] or {und: 2, text: 3, gen: 5} -> (2.0, 3.0, 5.0); ValueError naming the
    value otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(
            f"ratio {value!r} is one number; YAML reads an unquoted 2:3:5 as a base-60 integer, "
            f"so write ratio: [2, 3, 5] or ratio: \"2:3:5\""
        )
    if isinstance(value, str):
        parts: Any = value.replace(",", ":").split(":")
    elif isinstance(value, dict):
        extra = sorted(set(value) - set(TASKS))
        if extra:
            raise ValueError(f"unknown task(s) {extra} in ratio {value!r}; tasks are {list(TASKS)}")
        parts = [value.get(t, 0) for t in TASKS]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ValueError(f"ratio {value!r} must look like 'und:text:gen', e.g. '2:3:5'")
    if len(parts) != 3:
        raise ValueError(f"ratio {value!r} must have three parts und:text:gen, got {len(parts)}")
    try:
        nums = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"ratio {value!r} must be numbers, e.g. '2:3:5'") from None
    if any(n < 0 or n != n for n in nums):
        raise ValueError(f"ratio {value!r} must be non-negative")
    if sum(nums) == 0:
        raise ValueError(f"ratio {value!r} is all zero: no task would train")
    return nums  # type: ignore[return-value]


Ratio = Annotated[tuple[float, float, float], BeforeValidator(parse_ratio)]


def _path_or_mapping(value: Any) -> Any:
    return {"path": str(value)} if isinstance(value, (str, Path)) else value


class SourceConfig(BaseModel):
    """One dataset directory of a task stream."""

    model_config = ConfigDict(extra="forbid")

    path: str
    weight: float = Field(1.0, gt=0)  # share within its task (normalised over the task's sources)
    name: str = ""  # shown in stats and meta; defaults to the directory name

    @model_validator(mode="after")
    def _default_name(self) -> "SourceConfig":
        if not self.name:
            self.name = Path(str(self.path).rstrip("/")).name
        return self


Source = Annotated[SourceConfig, BeforeValidator(_path_or_mapping)]


class DataSettings(BaseModel):
    """What a run sets about its data (the training config's `data:` section)."""

    model_config = ConfigDict(extra="forbid")

    und: list[Source] = []  # image + conversation datasets
    text: list[Source] = []  # text datasets
    gen: list[Source] = []  # caption + pre-extracted codes datasets; name e.g. real/synthetic
    seq_len: Int = Field(4096, ge=8)  # packed row length
    tokenizer: str | None = None  # checkpoint or tokenizer directory
    seed: Int = Field(1234, ge=0)  # data order and CFG-dropout seed
    cfg_dropout: float = Field(0.1, ge=0.0, le=1.0)  # probability of dropping a gen caption (for CFG)
    num_workers: Int = Field(2, ge=0)  # decode processes per rank; 0 decodes in the training process
    truncation: Literal["truncate", "drop"] = "truncate"  # over-long text/und documents
    granularity: Literal[GRANULARITIES] = "micro_step"  # type: ignore[valid-type]  # see mixing.py
    # "rank": each data-parallel rank reads its own part of every source (production).
    # "global": every rank reads the whole stream as a single rank would and keeps its own
    # rows, so a step's global batch is the same for any dp size (costs dp x the reading;
    # for checking that a run does not depend on how the batch is split).
    sharding: Literal["rank", "global"] = "rank"
    lookahead: Int = Field(64, ge=1)  # documents buffered per source for packing
    max_wait_steps: Int = Field(4, ge=1)  # a buffered document is packed at the latest this many steps later
    chunk_size: Int = Field(64, ge=1)  # samples per read request (a contiguous run inside one shard)
    prefetch: Int = Field(4, ge=1)  # read requests in flight per source
    und_system_prompt: str | None = "default"  # "default" = conversation.DEFAULT_SYSTEM_PROMPT, null = none
    jpeg_draft: bool = False  # decode large JPEGs at reduced DCT scale (fast, not pixel-exact)
    worker_start_method: Literal["spawn", "fork", "forkserver"] = "fork"  # like torch DataLoader

    @model_validator(mode="after")
    def _unique_source_names(self) -> "DataSettings":
        for task in TASKS:
            names = [s.name for s in getattr(self, task)]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"data.{task}", f"source names must be unique, {dup} repeat (set `name`)")
        return self


class DataConfig(DataSettings):
    """The loader's whole configuration: the run's settings plus the stage's mix and layout."""

    ratio: Ratio  # und:text:gen rows per step; a 0 turns a task off
    # Earlier phases of the stage with their own ratio: [[until_step, ratio], ...], ascending;
    # steps < until_step use that ratio, later steps `ratio` (JanusFlow's stage 2 starts at
    # 30:50:20 for 10,000 steps). Empty: one ratio for the whole stage.
    ratio_phases: list[tuple[Int, Ratio]] = []
    global_batch: Int = Field(ge=1)  # packed rows per optimizer step, all ranks together
    micro_batch_rows: Int = Field(1, ge=1)  # rows per micro-batch per rank
    # The engine passes dp_rank/dp_size to build_train_loader; these are for tools (inspect).
    dp_size: Int = Field(1, ge=1)
    dp_rank: Int = Field(0, ge=0)

    @model_validator(mode="after")
    def _layout(self) -> "DataConfig":
        if self.dp_rank >= self.dp_size:
            raise ConfigError("data.dp_rank", f"{self.dp_rank} must be in [0, dp_size={self.dp_size})")
        unit = self.dp_size * self.micro_batch_rows
        if self.global_batch % unit:
            raise ConfigError("data.global_batch", f"{self.global_batch} must be divisible by dp_size*micro_batch_rows={unit}")
        for task, share in zip(TASKS, self.ratio):
            if share > 0 and not getattr(self, task):
                raise ConfigError(f"data.{task}", f"data.ratio gives {task} a share of {share:g} but lists no sources")
        until = [u for u, _ in self.ratio_phases]
        if any(u < 1 for u in until) or until != sorted(set(until)):
            raise ConfigError("data.ratio_phases", f"until_step values must be >= 1 and strictly ascending, got {until}")
        for _, r in self.ratio_phases:
            for task, share in zip(TASKS, r):
                if share > 0 and not getattr(self, task):
                    raise ConfigError(f"data.{task}", f"data.ratio_phases gives {task} a share of {share:g} but lists no sources")
        return self

    def ratio_at(self, step: int) -> tuple[float, float, float]:
        """The und:text:gen ratio of the stage's step `step` (0-based)."""
        for until, r in self.ratio_phases:
            if step < until:
                return r
        return self.ratio

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        d = dict(d or {})
        if "data" in d and isinstance(d["data"], dict) and len(d) == 1:
            d = dict(d["data"])
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise from_validation_error(e, "data", where="docs/data.md") from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "DataConfig":
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ConfigError("data", f"{path}: a data config must be a mapping, got {type(d).__name__}")
        if "data" in d and isinstance(d["data"], dict) and len(d) == 1:
            d = d["data"]
        d = dict(d)
        base = Path(path).parent
        for task in TASKS:  # relative source paths are relative to the YAML file
            sources = list(d.get(task) or [])
            for i, s in enumerate(sources):
                if isinstance(s, str) and not Path(s).is_absolute():
                    sources[i] = str(base / s)
                elif isinstance(s, dict) and "path" in s and not Path(str(s["path"])).is_absolute():
                    sources[i] = dict(s, path=str(base / s["path"]))
            if task in d:
                d[task] = sources
        tok = d.get("tokenizer")
        if isinstance(tok, str) and not Path(tok).is_absolute() and (base / tok).exists():
            d["tokenizer"] = str(base / tok)
        d.update(overrides or {})
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump()
        out["ratio"] = list(self.ratio)
        return out

    def task_ratio(self) -> dict[str, float]:
        return dict(zip(TASKS, self.ratio))


@dataclass(frozen=True)
class ImageConfig:
    """The model's image geometry, as the data path needs it (never hard-coded)."""

    image_size: int  # und image side (SigLIP input)
    num_image_tokens: int  # und tokens per image
    gen_image_size: int  # VQ encoder / VAE input side
    num_gen_tokens: int  # VQ codes (Janus-Pro) or latent tokens (JanusFlow) per gen image
    codebook_size: int  # 0 for JanusFlow
    gen_kind: str = "vq"  # "vq" (Janus-Pro: codes) or "flow" (JanusFlow: VAE latents)
    latent_shape: tuple[int, int, int] | None = None  # JanusFlow: [C, h, w] of a stored latent
    repa_image: bool = False  # JanusFlow: gen documents carry their image (REPA on)
    t_logit_mean: float = 0.0  # JanusFlow: t ~ sigmoid(N(mean, std))
    t_logit_std: float = 1.0

    @classmethod
    def from_model(cls, cfg: Any) -> "ImageConfig":
        """From an ImageConfig, a dict with these keys, or a model config (JanusConfig or
        JanusFlowConfig)."""
        if isinstance(cfg, ImageConfig):
            return cfg
        if isinstance(cfg, dict):
            return cls(**cfg)
        flow = getattr(cfg, "flow", None)
        if flow is not None:
            side = int(cfg.latent_size)
            return cls(
                image_size=int(cfg.vision.image_size),
                num_image_tokens=int(cfg.num_image_tokens),
                gen_image_size=int(cfg.image_size),
                num_gen_tokens=int(cfg.num_gen_tokens),
                codebook_size=0,
                gen_kind="flow",
                latent_shape=(int(flow.latent_channels), side, side),
                repa_image=float(flow.repa_weight) > 0,
                t_logit_mean=float(flow.t_logit_mean),
                t_logit_std=float(flow.t_logit_std),
            )
        grid = getattr(cfg, "gen_grid", None)
        if grid is None:
            grid = cfg.gen_image_size // cfg.vq.downsample
        return cls(
            image_size=int(cfg.vision.image_size),
            num_image_tokens=int(cfg.num_image_tokens),
            gen_image_size=int(cfg.gen_image_size),
            num_gen_tokens=int(grid) * int(grid),
            codebook_size=int(cfg.vq.codebook_size),
        )
