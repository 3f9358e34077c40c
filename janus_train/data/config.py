"""The data configuration: a plain dataclass, loadable from YAML or from a dict (the training
engine embeds it under `data:` in its Hydra config).

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

Every key and its meaning is listed on `DataConfig` below and in docs/data.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from janus_train.data.batch import TASKS
from janus_train.data.mixing import GRANULARITIES

# The Janus-Pro report's three stages (Table 2): und:text:gen ratio and global batch.
STAGES: dict[int, dict[str, Any]] = {
    1: {"ratio": (1.0, 0.0, 3.0), "global_batch": 256},
    2: {"ratio": (2.0, 3.0, 5.0), "global_batch": 512},
    3: {"ratio": (5.0, 1.0, 4.0), "global_batch": 128},
}
TRUNCATION = ("truncate", "drop")


@dataclass
class SourceConfig:
    """One dataset directory of a task stream."""

    path: str
    weight: float = 1.0  # share within its task (normalised over the task's sources)
    name: str = ""  # shown in stats and meta; defaults to the directory name

    def __post_init__(self) -> None:
        if not self.name:
            self.name = Path(str(self.path).rstrip("/")).name


@dataclass
class DataConfig:
    und: list[SourceConfig] = field(default_factory=list)
    text: list[SourceConfig] = field(default_factory=list)
    gen: list[SourceConfig] = field(default_factory=list)
    # und:text:gen rows per step; a 0 turns a task off. `stage` (1/2/3) fills ratio and
    # global_batch from the Janus-Pro recipe when they are not given.
    ratio: tuple[float, float, float] | None = None  # default: the stage's, else 1:0:3
    stage: int | None = None
    seq_len: int = 4096
    global_batch: int | None = None  # default: the stage's, else 256
    micro_batch_rows: int = 1
    # The engine passes dp_rank/dp_size to build_train_loader; these are for tools (inspect).
    dp_size: int = 1
    dp_rank: int = 0
    seed: int = 1234
    cfg_dropout: float = 0.1  # probability of dropping a gen caption (for CFG)
    tokenizer: str | None = None  # checkpoint or tokenizer directory
    num_workers: int = 2  # decode processes per rank; 0 decodes in the training process
    truncation: str = "truncate"  # over-long text/und documents: "truncate" or "drop"
    granularity: str = "micro_step"  # see mixing.py: "micro_step" (ZeRO-3 safe) or "row"
    # "rank": each data-parallel rank reads its own part of every source (production).
    # "global": every rank reads the whole stream as a single rank would and keeps its own
    # rows, so a step's global batch is the same for any dp size (costs dp x the reading;
    # for checking that a run does not depend on how the batch is split).
    sharding: str = "rank"
    lookahead: int = 64  # documents buffered per source for packing
    max_wait_steps: int = 4  # a buffered document is packed at the latest this many steps later
    chunk_size: int = 64  # samples per read request (a contiguous run inside one shard)
    prefetch: int = 4  # read requests in flight per source
    und_system_prompt: str | None = "default"  # "default" = conversation.DEFAULT_SYSTEM_PROMPT, null = none
    jpeg_draft: bool = False  # decode large JPEGs at reduced DCT scale (fast, not pixel-exact)
    worker_start_method: str = "fork"  # like torch DataLoader; spawn/forkserver need a __main__ guard

    def __post_init__(self) -> None:
        for task in TASKS:
            setattr(self, task, [_source(task, i, s) for i, s in enumerate(getattr(self, task) or [])])
        if self.stage is not None and self.stage not in STAGES:
            raise ValueError(f"data.stage={self.stage!r} must be one of {sorted(STAGES)}")
        preset = STAGES[self.stage if self.stage is not None else 1]
        if self.ratio is None:
            self.ratio = preset["ratio"]
        if self.global_batch is None:
            self.global_batch = preset["global_batch"]
        self.ratio = _ratio(self.ratio)
        self.validate()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        d = dict(d or {})
        if "data" in d and isinstance(d["data"], dict) and len(d) == 1:
            d = dict(d["data"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "DataConfig":
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a data config must be a mapping, got {type(d).__name__}")
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
        out = dataclasses.asdict(self)
        out["ratio"] = list(self.ratio)
        return out

    # ---- checks ---------------------------------------------------------------------------
    def validate(self) -> "DataConfig":
        def positive(name: str, value: Any, minimum: int = 1) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"data.{name}={value!r} must be an integer >= {minimum}")

        positive("seq_len", self.seq_len, 8)
        positive("global_batch", self.global_batch)
        positive("micro_batch_rows", self.micro_batch_rows)
        positive("dp_size", self.dp_size)
        positive("num_workers", self.num_workers, 0)
        positive("lookahead", self.lookahead)
        positive("max_wait_steps", self.max_wait_steps)
        positive("chunk_size", self.chunk_size)
        positive("prefetch", self.prefetch)
        if not isinstance(self.dp_rank, int) or not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"data.dp_rank={self.dp_rank!r} must be in [0, dp_size={self.dp_size})")
        unit = self.dp_size * self.micro_batch_rows
        if self.global_batch % unit:
            raise ValueError(
                f"data.global_batch={self.global_batch} must be divisible by dp_size*micro_batch_rows={unit}"
            )
        if not 0.0 <= float(self.cfg_dropout) <= 1.0:
            raise ValueError(f"data.cfg_dropout={self.cfg_dropout!r} must be in [0, 1]")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"data.truncation={self.truncation!r} must be one of {TRUNCATION}")
        if self.sharding not in ("rank", "global"):
            raise ValueError(f"data.sharding={self.sharding!r} must be 'rank' or 'global'")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"data.granularity={self.granularity!r} must be one of {GRANULARITIES}")
        if self.worker_start_method not in ("spawn", "fork", "forkserver"):
            raise ValueError(f"data.worker_start_method={self.worker_start_method!r} must be spawn, fork or forkserver")
        for task, share in zip(TASKS, self.ratio):
            if share > 0 and not getattr(self, task):
                raise ValueError(f"data.ratio gives {task} a share of {share:g} but data.{task} lists no sources")
            names = [s.name for s in getattr(self, task)]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"data.{task}: source names must be unique, {sorted(dup)} repeat (set `name`)")
        return self

    def task_ratio(self) -> dict[str, float]:
        return dict(zip(TASKS, self.ratio))


def _source(task: str, i: int, s: Any) -> SourceConfig:
    where = f"data.{task}[{i}]"
    if isinstance(s, SourceConfig):
        src = s
    elif isinstance(s, str):
        src = SourceConfig(path=s)
    elif isinstance(s, dict):
        bad = sorted(set(s) - {"path", "weight", "name"})
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad}; a source has path, weight, name")
        if "path" not in s:
            raise ValueError(f"{where}: missing 'path'")
        src = SourceConfig(path=str(s["path"]), weight=s.get("weight", 1.0), name=s.get("name") or "")
    else:
        raise ValueError(f"{where}={s!r} must be a path or a mapping with path/weight/name")
    try:
        src.weight = float(src.weight)
    except (TypeError, ValueError):
        raise ValueError(f"{where}.weight={src.weight!r} must be a number") from None
    if not src.weight > 0:
        raise ValueError(f"{where}.weight={src.weight!r} must be > 0 (remove the source to disable it)")
    return src


def _ratio(r: Any) -> tuple[float, float, float]:
    value = r
    if isinstance(r, (int, float)) and not isinstance(r, bool):
        raise ValueError(
            f"data.ratio={r!r} is one number; YAML reads an unquoted 2:3:5 as a base-60 integer, "
            f"so write ratio: [2, 3, 5] or ratio: \"2:3:5\""
        )
    if isinstance(r, str):
        r = r.replace(",", ":").split(":")
    if isinstance(r, dict):
        bad = sorted(set(r) - set(TASKS))
        if bad:
            raise ValueError(f"data.ratio={value!r}: unknown task(s) {bad}; tasks are {TASKS}")
        r = [r.get(t, 0) for t in TASKS]
    try:
        out = tuple(float(x) for x in r)
    except (TypeError, ValueError):
        raise ValueError(f"data.ratio={value!r} must be three numbers und:text:gen") from None
    if len(out) != 3 or any(x < 0 for x in out) or sum(out) <= 0:
        raise ValueError(f"data.ratio={value!r} must be three non-negative numbers und:text:gen, not all 0")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageConfig:
    """The model's image geometry, as the data path needs it (never hard-coded)."""

    image_size: int  # und image side (SigLIP input)
    num_image_tokens: int  # und tokens per image
    gen_image_size: int  # VQ encoder input side
    num_gen_tokens: int  # VQ codes per gen image
    codebook_size: int

    @classmethod
    def from_model(cls, cfg: Any) -> "ImageConfig":
        """From an ImageConfig, a dict with these keys, or a model config (JanusConfig)."""
        if isinstance(cfg, ImageConfig):
            return cfg
        if isinstance(cfg, dict):
            return cls(**cfg)
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
