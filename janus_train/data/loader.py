"""The training data loader: sources -> exact per-step task mix -> packed micro-batches.

Public API (what the training engine calls):

    loader = build_train_loader(data_cfg, tokenizer, model_image_cfg, dp_rank, dp_size)
    for micro_batches in loader:      # one item per optimizer step, endless
        for mb in micro_batches:      # list[PackedBatch], the same length on every rank;
            ...                       # micro-step j holds the same task on every rank
    sd = loader.state_dict()          # JSON-able; save it with the checkpoint (per rank)
    loader.load_state_dict(sd)        # a fresh loader continues exactly where sd was taken
    loader.stats()                    # {"step", "skipped": {source: {reason: n}}, "samples": {source: n}}
    loader.close()                    # stops the worker processes

`data_cfg` is a `DataConfig` (or a dict / YAML path for one); `tokenizer` a transformers fast
tokenizer, a path, or None (then `data_cfg.tokenizer`); `model_image_cfg` the model config
(`JanusConfig`) or an `ImageConfig`. Each micro-batch has `micro_batch_rows` rows of `seq_len`;
its `meta` carries "step", "micro_step", "task" (und/text/gen, or "mixed" with
granularity="row"), "rank", "keys" / "sources" per row, "row_tasks", "doc_lengths",
"num_docs", "pad_tokens", and "skipped" (this rank's skip counts so far).

How it works: `mixing.plan_step` fixes the rows per task and their (micro-step, rank) layout;
for each task this rank needs rows of, its `TaskPacker` fills them from the task's sources
(`SourceBlender` picks the source of every document); `sources.SourceStream`s deliver
documents decoded by a pool of worker processes; `packing.collate` builds the PackedBatch.
The state is the step, each stream's position, each packer's blender counts and the
positions of the documents in its look-ahead buffers (re-read on restore), and skip counts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

from janus_train.contracts import conversation as conv
from janus_train.contracts.batch import TASK_ID, TASKS, PackedBatch
from janus_train.contracts.errors import ConfigError
from janus_train.data.config import DataConfig, DataSettings, ImageConfig
from janus_train.data.formats import CODES_PART
from janus_train.data.mixing import plan_step
from janus_train.contracts.batch import Row, collate
from janus_train.data.packing import TaskPacker
from janus_train.data.shards import META_DIR, ShardInfo, ShardReader, dataset_shards, read_janus_meta
from janus_train.data.sources import DecodePool, SkipStats, SourcePlan, SourceStream
from janus_train.contracts.tokens import TokenizerInfo
from janus_train.data.tokenize import DocBuilder, flow_draw

log = logging.getLogger("janus_train.data")

STATE_VERSION = 1


class TrainLoader:
    def __init__(
        self,
        cfg: DataConfig,
        tok: TokenizerInfo,
        image: ImageConfig,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        unit = dp_size * cfg.micro_batch_rows
        if cfg.global_batch % unit:
            raise ValueError(f"global_batch={cfg.global_batch} must be divisible by dp_size*micro_batch_rows={unit}")
        self.cfg, self.tok, self.image = cfg, tok, image
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.step = 0
        self.stats_ = SkipStats()
        system = conv.DEFAULT_SYSTEM_PROMPT if cfg.und_system_prompt == "default" else (cfg.und_system_prompt or None)
        builder = DocBuilder(
            tok=tok,
            seq_len=cfg.seq_len,
            num_image_tokens=image.num_image_tokens,
            image_size=image.image_size,
            num_gen_tokens=image.num_gen_tokens,
            codebook_size=image.codebook_size,
            seed=cfg.seed,
            cfg_dropout=cfg.cfg_dropout,
            truncation=cfg.truncation,
            system_prompt=system,
            jpeg_draft=cfg.jpeg_draft,
            gen_kind=image.gen_kind,
            latent_shape=image.latent_shape,
            repa_image=image.repa_image,
        )
        self.flow = image.gen_kind == "flow"
        ratios = [cfg.ratio] + [r for _, r in cfg.ratio_phases]
        self.active = [t for i, t in enumerate(TASKS) if any(r[i] > 0 for r in ratios)]
        self.source_names: dict[int, list[str]] = {TASK_ID[t]: [s.name for s in getattr(cfg, t)] for t in TASKS}
        # Every source is checked before any worker starts (seconds, not a stalled first step).
        self.vae_scale: float | None = check_sources(cfg, image, self.active)  # JanusFlow's VAE scaling factor
        plans: dict[str, list[SourcePlan]] = {}
        read_rank, read_size = (0, 1) if cfg.sharding == "global" else (dp_rank, dp_size)
        for task in self.active:
            plans[task] = [
                SourcePlan(f"{task}/{src.name}", dataset_shards(src.path), cfg.chunk_size, cfg.seed, read_rank, read_size)
                for src in getattr(cfg, task)
            ]
        self.pool = DecodePool(builder, cfg.num_workers, cfg.worker_start_method)
        self.streams: dict[str, list[SourceStream]] = {}
        self.packers: dict[str, TaskPacker] = {}
        for task in self.active:
            srcs = getattr(cfg, task)
            self.streams[task] = [
                SourceStream(task, f"{task}/{s.name}", plan, self.pool, cfg.prefetch, self.stats_) for s, plan in zip(srcs, plans[task])
            ]
            streams = self.streams[task]
            self.packers[task] = TaskPacker(
                [s.weight for s in srcs],
                cfg.seq_len,
                pull=lambda i, streams=streams: streams[i].next_doc(),
                lookahead=cfg.lookahead,
                max_wait_steps=cfg.max_wait_steps,
            )

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[PackedBatch]]:
        while True:
            yield self.next_step()

    def __next__(self) -> list[PackedBatch]:
        return self.next_step()

    def next_step(self) -> list[PackedBatch]:
        cfg = self.cfg
        plan = plan_step(cfg.ratio_at(self.step), cfg.global_batch, self.dp_size, cfg.micro_batch_rows, cfg.seed, self.step, cfg.granularity)
        if cfg.sharding == "global":
            # Pack the whole step as one rank would, then deal rows out micro-step by
            # micro-step, rank by rank; keep ours. The step's set of rows is then
            # independent of dp size whenever plan.rows is.
            rows = {t: iter(self.packers[t].pack(plan.rows[t], self.step)) for t in self.active if plan.rows[t] > 0}
            mine = []
            for per_rank in plan.micro_tasks:
                dealt = [[Row(TASK_ID[t], next(rows[t])) for t in tasks] for tasks in per_rank]
                mine.append(dealt[self.dp_rank])
        else:
            need = plan.rank_rows(self.dp_rank)
            rows = {t: iter(self.packers[t].pack(need[t], self.step)) for t in self.active if need[t] > 0}
            mine = [[Row(TASK_ID[t], next(rows[t])) for t in per_rank[self.dp_rank]] for per_rank in plan.micro_tasks]
        skipped = self.stats_.state_dict()["skipped"]
        out = []
        for j, mb_rows in enumerate(mine):
            if self.flow:
                self._draw_flow(mb_rows)
            meta = {"step": self.step, "micro_step": j, "task": plan.micro_step_task(j), "rank": self.dp_rank, "skipped": skipped}
            out.append(collate(mb_rows, cfg.seq_len, self.tok.pad_id, self.tok.image_id, self.source_names, meta, flow=self.flow))
        self.step += 1
        return out

    def _draw_flow(self, rows: list[Row]) -> None:
        """Each JanusFlow gen document's latent, noise and time, keyed by its stream position."""
        im = self.image
        for row in rows:
            for d in row.docs:
                if d.task == TASK_ID["gen"]:
                    d.flow = flow_draw(self.cfg.seed, f"{d.source}/{d.key}", d.pos, d.latent, self.vae_scale, im.t_logit_mean, im.t_logit_std)

    # ---- state ------------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": c.seed,
            "chunk_size": c.chunk_size,
            "seq_len": c.seq_len,
            "sources": {t: [[s.name, s.weight] for s in getattr(c, t)] for t in self.active},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "layout": self._layout(),
            "streams": {t: [s.state_dict() for s in self.streams[t]] for t in self.active},
            "packers": {t: self.packers[t].state_dict() for t in self.active},
            "stats": self.stats_.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {sd.get('version')!r}, this code reads {STATE_VERSION}")
        mine = self._layout()
        theirs = sd["layout"]
        for k, v in mine.items():
            got = theirs.get(k)
            if k == "sources":
                got = {t: [list(x) for x in lst] for t, lst in (got or {}).items()}
            if got != v:
                raise ValueError(f"data loader state was saved with {k}={got!r}; this loader has {k}={v!r}")
        self.step = int(sd["step"])
        self.stats_.load_state_dict(sd.get("stats", {}))
        for t in self.active:
            for stream, ssd in zip(self.streams[t], sd["streams"][t]):
                stream.load_state_dict(ssd)
            streams = self.streams[t]
            self.packers[t].load_state_dict(sd["packers"][t], fetch=lambda i, pos, streams=streams: streams[i].fetch(pos))

    def stats(self) -> dict[str, Any]:
        st = self.stats_.state_dict()
        return {"step": self.step, "skipped": st["skipped"], "samples": st["samples"]}

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_sources(cfg: DataSettings, image: ImageConfig, tasks: tuple[str, ...] | list[str] = TASKS) -> float | None:
    """Check every source of `tasks` (see `check_source`), and that JanusFlow's gen sources were
    encoded by one VAE. Returns that VAE's scaling factor (None for Janus-Pro)."""
    vae_scale: float | None = None
    for task in tasks:
        for i, src in enumerate(getattr(cfg, task)):
            key = f"data.{task}[{i}].path"
            scale = check_source(src.path, task, image, key)
            if vae_scale is not None and scale != vae_scale:
                raise ConfigError(key, f"data.gen sources were encoded with different VAEs (scaling factors {vae_scale} and "
                                       f"{scale} in {src.path}); one run trains on one VAE's latents")
            vae_scale = scale if scale is not None else vae_scale
    return vae_scale


def check_source(path: str, task: str, image: ImageConfig, key: str = "data") -> float | None:
    """Check one source directory the way the loader will read it, in seconds and before any
    worker starts: it exists and is an energon dataset with samples, its shards are on disk,
    its metadata names the task, und shards fit the model's image size, and gen shards are
    pre-tokenised for the model family (VQ codes for Janus-Pro, VAE latents for JanusFlow).
    A failure is a `ConfigError` naming `key`, the directory and the command that fixes it.
    Returns a JanusFlow gen source's VAE scaling factor, else None."""
    meta, shards = _check_dataset(key, path, task)
    if task == "und":
        resized = meta.get("und_resized_to")
        if resized is not None and int(resized) != image.image_size:
            # Resizing a pre-resized image again is not what the model was meant to see (and
            # upscaling loses detail): the shards fit one image size only.
            raise ConfigError(key, f"{path} was built with --und-resize {resized}, but the model's und image size is "
                                   f"{image.image_size}; rebuild it from the originals with --und-resize {image.image_size} "
                                   "(or without --und-resize)")
    if task == "gen":
        return _check_gen_source(key, path, meta, shards[0], image)
    return None


_BUILD = "python -m data_pipelines.build_shards --task {task} --input MANIFEST --out {path}"


def _check_dataset(key: str, path: str, task: str) -> tuple[dict[str, Any], list[ShardInfo]]:
    """(janus meta, shards with samples that are on disk) of one source directory; ConfigError
    saying what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(key, f"data directory {path} does not exist")
    build = _BUILD.format(task=task, path=path)
    if not any(root.iterdir()):
        raise ConfigError(key, f"data directory {path} is empty; build it with `{build}`")
    try:
        shards = dataset_shards(root)
    except FileNotFoundError as e:  # no energon index
        raise ConfigError(key, str(e)) from None
    except ValueError as e:  # an index listing no shards
        raise ConfigError(key, f"{e}; build it with `{build}`") from None
    if not shards:
        raise ConfigError(key, f"{path} holds no samples (every shard in {META_DIR}/.info.json is empty); build it with `{build}`")
    present = [s for s in shards if Path(s.path).is_file()]
    if not present:  # some missing are counted and skipped (missing_shard) while training; all is no data
        raise ConfigError(key, f"{path}: none of the {len(shards)} shard(s) listed in {META_DIR}/.info.json is on disk "
                               f"(e.g. {shards[0].name}); copy the whole directory again or rebuild it with `{build}`")
    meta = read_janus_meta(root)
    if meta.get("task") not in (None, task):
        raise ConfigError(key, f"{path} holds {meta['task']!r} samples, not {task!r} (data.{task} lists it)")
    return meta, present


def _check_gen_source(key: str, path: str, meta: dict[str, Any], first: ShardInfo, image: ImageConfig) -> float | None:
    """A gen source must hold what the model family trains on: VQ codes (Janus-Pro) or VAE
    latents (JanusFlow). The janus meta says so when a pretokenizer wrote the shards; shards
    from build_shards (codes given in the manifest, or images only) are told apart by their
    first sample. Returns the VAE scaling factor (JanusFlow) or None."""
    shape = meta.get("latent_shape")
    if image.gen_kind != "flow":
        if shape is not None:
            raise ConfigError(key, f"{path} holds VAE latents (pretokenize_vae), which JanusFlow trains on; a Janus-Pro model "
                                   f"needs VQ codes: `python -m data_pipelines.pretokenize_vq --ckpt INIT_CHECKPOINT --in IMAGES_DIR --out DIR`")
        if CODES_PART not in _first_sample_parts(first):
            raise ConfigError(key, f"{path} is not pre-tokenised: its gen samples have no {CODES_PART} (VQ codes); encode it "
                                   f"once with `python -m data_pipelines.pretokenize_vq --ckpt INIT_CHECKPOINT --in {path} "
                                   f"--out {path.rstrip('/')}_vq` and train on the output")
        return None
    scale = meta.get("vae_scaling_factor")
    if shape is None or scale is None:
        raise ConfigError(key, f"{path} has no VAE latents (its janus meta lacks latent_shape / vae_scaling_factor); encode it "
                               f"once with `python -m data_pipelines.pretokenize_vae --ckpt INIT_CHECKPOINT --vae VAE_DIR --in {path} "
                               f"--out {path.rstrip('/')}_vae` and train on the output")
    if tuple(shape) != tuple(image.latent_shape or ()):
        raise ConfigError(key, f"{path} holds latents {list(shape)}, the model takes {list(image.latent_shape or ())}")
    return float(scale)


def _first_sample_parts(shard: ShardInfo) -> set[str]:
    """The part names of a shard's first sample (all names when it cannot be read: a damaged
    sample is the loader's to skip and count, not a reason to refuse the source)."""
    try:
        sample = ShardReader().read(shard.path, 0, 1)[0]
    except (OSError, IndexError, ValueError):
        sample = None
    if sample is None or sample.parts is None:
        return {CODES_PART}
    return set(sample.parts)


def build_train_loader(
    data_cfg: DataConfig | dict[str, Any] | str | Path,
    tokenizer: Any,
    model_image_cfg: Any,
    dp_rank: int | None = None,
    dp_size: int | None = None,
) -> TrainLoader:
    """The loader for one data-parallel rank (see the module docstring)."""
    if isinstance(data_cfg, (str, Path)):
        data_cfg = DataConfig.from_yaml(data_cfg)
    elif isinstance(data_cfg, dict):
        data_cfg = DataConfig.from_dict(data_cfg)
    elif not isinstance(data_cfg, DataConfig):
        # e.g. an omegaconf DictConfig from the engine's Hydra tree
        try:
            from omegaconf import OmegaConf

            data_cfg = DataConfig.from_dict(OmegaConf.to_container(data_cfg, resolve=True))  # type: ignore[arg-type]
        except Exception as e:
            raise TypeError(f"data_cfg must be a DataConfig, dict or YAML path, got {type(data_cfg).__name__}") from e
    if tokenizer is None:
        if not data_cfg.tokenizer:
            raise ValueError("no tokenizer given and data.tokenizer is not set")
        tokenizer = data_cfg.tokenizer
    tok = tokenizer if isinstance(tokenizer, TokenizerInfo) else TokenizerInfo.from_hf(tokenizer)
    image = ImageConfig.from_model(model_image_cfg)
    return TrainLoader(
        data_cfg,
        tok,
        image,
        data_cfg.dp_rank if dp_rank is None else dp_rank,
        data_cfg.dp_size if dp_size is None else dp_size,
    )
