"""Pre-tokenisation of gen datasets, shared by both model families: the driver reads every
input shard, applies the gen preprocessing (short side to the model's gen image size, centre
crop, [-1, 1]), encodes batches with an `ImageEncoder`, and writes each sample to the
same-named output shard with `json` (caption, source, prompt_tokenizer), `prompt_ids.npy`
(int32 ids of `gen_prompt(caption)`, so the loader need not tokenise; it checks the tokenizer
fingerprint and re-tokenises if it differs) and the encoder's parts:

    data_pipelines.pretokenize_vq   Janus-Pro: `codes.npy` (the VQ's codes)
    data_pipelines.pretokenize_vae  JanusFlow: `latent_mean.npy`, `latent_std.npy` (the VAE's
                                    posterior, fp16; the loader samples from it)

Resumable: an output shard is done once its report `OUT/.build/<shard>.json` exists. Samples
that fail (damaged image, empty caption, bad json) are skipped and counted in
`OUT/build_report.json`. The output directory is an energon dataset like the input.

Distributed: the shards (sorted by name) are split over processes, shard i to rank i % world
size; the (rank, world size) come from `--rank/--world-size`, else torchrun's RANK/WORLD_SIZE,
else a Slurm array (`resolve_process_slot`). No process group is needed: processes share nothing
but the output directory. The dataset-level files (energon's `.nv-meta/`, the janus meta,
`build_report.json`) are written once, by whichever process finds every shard's report present
(under a lock, `finalize`), or by `--finalize-only`. The result is byte for byte the one-process
result: a shard's bytes depend only on that shard and the batch size.

Image decoding runs in `--workers` DataLoader worker processes, in order, so the encoder (the
GPU) is not left waiting for JPEG decoding; the output does not depend on the worker count.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from tqdm import tqdm

from janus_train.contracts import conversation as conv
from janus_train.data import formats as fmt
from janus_train.contracts.preprocess import gen_crop, gen_crop_to_pixels, open_rgb
from janus_train.data.shards import ShardInfo, ShardReader, dataset_shards, prepare_energon, read_janus_meta, write_janus_meta
from janus_train.contracts.tokens import TokenizerInfo

MAX_EXAMPLES = 200


@dataclass
class ImageEncoder:
    """What a family stores for a gen image: `encode(pixels [B, 3, S, S] in [-1, 1]) -> one dict
    of {part name: bytes} per image`, at `image_size`; `meta` goes into the dataset's janus meta
    and the build report; `name` labels the progress bar and the builder. `encode` may be None
    with a `load` that returns it: the weights are then read only by a process that has a shard
    to encode (a finalising or idle process needs only the meta)."""

    name: str
    image_size: int
    encode: Callable[[torch.Tensor], list[dict[str, bytes]]] | None
    meta: dict[str, Any]
    load: Callable[[], Callable[[torch.Tensor], list[dict[str, bytes]]]] | None = None

    def encoder(self) -> Callable[[torch.Tensor], list[dict[str, bytes]]]:
        if self.encode is None:
            if self.load is None:
                raise RuntimeError(f"{self.name} encoder has neither encode nor load")
            self.encode = self.load()
        return self.encode


def vq_encoder(model: Any, device: str) -> ImageEncoder:
    """Janus-Pro: `codes.npy`, uint16 (int32 for codebooks over 65536)."""
    codebook = int(model.config.vq.codebook_size)
    dtype = np.uint16 if codebook <= 65536 else np.int32

    def encode(x: torch.Tensor) -> list[dict[str, bytes]]:
        with torch.no_grad():
            codes = model.vq.encode_codes(x.to(device)).cpu().numpy()
        return [{fmt.CODES_PART: fmt.npy_bytes(c.astype(dtype))} for c in codes]

    return ImageEncoder("vq", int(model.config.gen_image_size), encode, vq_meta(model.config))


def vq_meta(config: Any) -> dict[str, Any]:
    """The janus meta of VQ codes, from a Janus-Pro config (no weights needed)."""
    return {"num_gen_tokens": int(config.gen_grid) ** 2, "codebook_size": int(config.vq.codebook_size)}


# ---- which shards this process encodes -------------------------------------------------------


@dataclass(frozen=True)
class ProcessSlot:
    """This process's share of a distributed run: shard i (by sorted name) is rank i % world_size's."""

    rank: int
    world_size: int
    source: str  # where the values came from, for messages


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    try:
        return int(str(value))
    except ValueError:
        raise ValueError(f"{name}={value!r} in the environment is not an integer") from None


def _slurm_array_slot(env: Mapping[str, str]) -> ProcessSlot | None:
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if "SLURM_ARRAY_TASK_COUNT" not in env:
        raise ValueError(f"SLURM_ARRAY_TASK_ID={task} is set but SLURM_ARRAY_TASK_COUNT is not; give --rank/--world-size")
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    low = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    offset = task - low
    # --array=0-30:2 numbers its tasks 0, 2, ..., 30: still a dense 0..count-1 once divided
    if step > 1 and offset % step == 0:
        offset //= step
    src = f"Slurm array task {task} (SLURM_ARRAY_TASK_MIN={low}, SLURM_ARRAY_TASK_COUNT={count})"
    return ProcessSlot(offset, count, src)


def resolve_process_slot(rank: int | None = None, world_size: int | None = None, env: Mapping[str, str] | None = None) -> ProcessSlot:
    """(rank, world size) of this process: `rank`/`world_size` (--rank/--world-size) if given,
    else torchrun's RANK/WORLD_SIZE, else a Slurm array task (SLURM_ARRAY_TASK_ID minus
    SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT), else (0, 1). torchrun inside an array task
    combines both (array task a of A, torchrun rank r of R -> rank a*R + r of A*R), so that no
    two processes encode the same shard. Bad values raise ValueError naming where they came from."""
    env = os.environ if env is None else env
    if (rank is None) != (world_size is None):
        raise ValueError(f"--rank and --world-size go together (got --rank {rank}, --world-size {world_size})")
    if rank is not None and world_size is not None:
        slot = ProcessSlot(rank, world_size, "--rank/--world-size")
    else:
        launched = None
        if "RANK" in env or "WORLD_SIZE" in env:
            if "RANK" not in env or "WORLD_SIZE" not in env:
                which = "RANK" if "RANK" in env else "WORLD_SIZE"
                raise ValueError(f"only {which} is set in the environment (torchrun sets RANK and WORLD_SIZE); "
                                 "unset it or give --rank/--world-size")
            launched = ProcessSlot(_env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), "torchrun (RANK/WORLD_SIZE)")
        array = _slurm_array_slot(env)
        if launched and array:
            _check_slot(launched)
            _check_slot(array)
            slot = ProcessSlot(array.rank * launched.world_size + launched.rank, array.world_size * launched.world_size,
                               f"{array.source} x {launched.source}")
        else:
            slot = launched or array or ProcessSlot(0, 1, "one process")
    _check_slot(slot)
    return slot


def _check_slot(slot: ProcessSlot) -> None:
    if slot.world_size < 1:
        raise ValueError(f"world size must be >= 1, got {slot.world_size} (from {slot.source})")
    if not 0 <= slot.rank < slot.world_size:
        hint = (" (an array with gaps, e.g. --array=1,5: use a dense range such as --array=0-N, or --rank/--world-size)"
                if slot.source.startswith("Slurm") else "")
        raise ValueError(f"rank {slot.rank} is not in 0..{slot.world_size - 1} for world size {slot.world_size} "
                         f"(from {slot.source}){hint}")


def sorted_shards(in_dir: str | Path) -> list[ShardInfo]:
    """The input's shards in the order every process agrees on: by name."""
    return sorted(dataset_shards(in_dir), key=lambda s: s.name)


def shards_for(shards: list[ShardInfo], slot: ProcessSlot) -> list[ShardInfo]:
    """Shard i of the sorted list goes to rank i % world size: deterministic, and balanced to
    within one shard whatever the world size."""
    ordered = sorted(shards, key=lambda s: s.name)
    return [sh for i, sh in enumerate(ordered) if i % slot.world_size == slot.rank]


def report_path(out_dir: Path, shard: ShardInfo) -> Path:
    return out_dir / ".build" / (Path(shard.name).name + ".json")


# ---- reading and decoding, in DataLoader workers ----------------------------------------------

CHUNK = 16  # samples per worker task: big enough to amortise the hand-off, small enough to keep order cheap


def _as_is(x: Any) -> Any:
    return x


class _DecodedChunks(torch.utils.data.Dataset):
    """Item j = (shard index, decoded samples of one chunk of that shard), in shard order. Each
    sample is (key, (reason, detail) or None, json meta, kept image parts, uint8 crop [S, S, 3])."""

    def __init__(self, shards: list[ShardInfo], image_size: int, keep_image: bool, chunk: int = CHUNK) -> None:
        self.paths = [sh.path for sh in shards]
        self.items = [(i, a, min(sh.count, a + chunk)) for i, sh in enumerate(shards) for a in range(0, sh.count, chunk)]
        self.image_size, self.keep_image = image_size, keep_image
        self._reader: ShardReader | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> tuple[int, list[tuple]]:
        i, start, stop = self.items[j]
        if self._reader is None:
            self._reader = ShardReader()
        return i, [self._decode(raw) for raw in self._reader.read(self.paths[i], start, stop)]

    def _decode(self, raw: Any) -> tuple:
        # SampleError is passed as (reason, detail): exceptions do not always survive pickling
        # between processes, plain tuples do.
        if raw.error is not None:
            return raw.key, (raw.error.reason, raw.error.detail), None, None, None
        try:
            obj = fmt.parse_json(raw.parts.get("json"))
            meta = dict(obj)
            meta["caption"] = fmt.get_caption(obj)
            img_bytes = fmt.image_part(raw.parts)
            if img_bytes is None:
                raise fmt.SampleError("missing_key", "gen sample has no image to encode")
            try:
                # uint8 crop here, float in the encoding process: a quarter of the bytes between
                # processes, and numpy arrays travel pickled, not through /dev/shm (small in containers)
                crop = np.ascontiguousarray(gen_crop(open_rgb(img_bytes), self.image_size))
            except Exception as e:
                raise fmt.SampleError("bad_image", f"{type(e).__name__}: {e}"[:200]) from None
        except fmt.SampleError as e:
            return raw.key, (e.reason, e.detail), None, None, None
        kept = {ext: raw.parts[ext] for ext in fmt.IMAGE_PARTS if ext in raw.parts} if self.keep_image else {}
        return raw.key, None, meta, kept, crop


class _ShardWriter:
    """One output shard: batches of `batch_size` valid samples, encoded in order. Batches never
    span shards, so a shard's bytes do not depend on which process or which neighbours it had."""

    def __init__(self, index: int, shard: ShardInfo, out_dir: Path, encode: Callable, tok: TokenizerInfo,
                 batch_size: int) -> None:
        import webdataset as wds

        self.index, self.encode, self.tok, self.batch_size = index, encode, tok, batch_size
        self.out_path = out_dir / Path(shard.name).name
        self.report_path = report_path(out_dir, shard)
        self.tmp = self.out_path.with_name(self.out_path.name + ".tmp")
        self.report: dict[str, Any] = {"shard": self.out_path.name, "rows": 0, "written": 0, "skipped": {}, "examples": []}
        self.file = open(self.tmp, "wb")
        self.writer = wds.TarWriter(self.file, mtime=0)
        self.pending: list[tuple[str, dict[str, Any], dict[str, bytes], torch.Tensor]] = []

    def add(self, sample: tuple) -> None:
        key, error, meta, kept, crop = sample
        self.report["rows"] += 1
        if error is not None:
            reason, detail = error
            self.report["skipped"][reason] = self.report["skipped"].get(reason, 0) + 1
            if len(self.report["examples"]) < MAX_EXAMPLES:
                self.report["examples"].append({"key": key, "reason": reason, "detail": detail})
            return
        meta["prompt_tokenizer"] = self.tok.fingerprint
        self.pending.append((key, meta, kept, gen_crop_to_pixels(crop)))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        encoded = self.encode(torch.stack([p[3] for p in self.pending]))
        for (key, meta, kept, _), enc in zip(self.pending, encoded):
            prompt = np.asarray(self.tok.encode(conv.gen_prompt(meta["caption"])), dtype=np.int32)
            sample = {"__key__": key, "json": json.dumps(meta).encode(), **enc, fmt.PROMPT_IDS_PART: fmt.npy_bytes(prompt), **kept}
            self.writer.write(sample)
            self.report["written"] += 1
        self.pending.clear()

    def finish(self) -> dict[str, Any]:
        """Write the shard (tmp + replace), then its report: the report's presence means done."""
        self.flush()
        self.writer.close()
        self.file.close()
        if self.report["written"]:
            os.replace(self.tmp, self.out_path)
        else:
            self.tmp.unlink()
        tmp = self.report_path.with_name(self.report_path.name + ".tmp")
        tmp.write_text(json.dumps(self.report) + "\n")
        os.replace(tmp, self.report_path)
        return self.report


def encode_shards(encoder: ImageEncoder, tok: TokenizerInfo, shards: list[ShardInfo], out_dir: Path, batch_size: int,
                  keep_image: bool, workers: int, bar: tqdm) -> list[dict[str, Any]]:
    """Encode `shards` into `out_dir` (one report each); `workers` processes decode the images."""
    if not shards:
        return []
    data = _DecodedChunks(shards, encoder.image_size, keep_image)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                                         prefetch_factor=4 if workers else None)
    chunks = iter(loader)  # workers fork here, before the model is loaded (and CUDA initialised)
    encode = encoder.encoder()
    reports: list[dict[str, Any]] = []
    writer: _ShardWriter | None = None
    for i, samples in chunks:
        if writer is None or writer.index != i:
            if writer is not None:
                reports.append(writer.finish())
            writer = _ShardWriter(i, shards[i], out_dir, encode, tok, batch_size)
        for sample in samples:
            writer.add(sample)
        bar.update(len(samples))
    if writer is not None:
        reports.append(writer.finish())
    return reports


# ---- the dataset-level files, written once -----------------------------------------------------


@contextmanager
def _finalize_lock(out_dir: Path, wait: bool) -> Iterator[bool]:
    """An exclusive flock on OUT/.build/finalize.lock; yields False if another process holds it
    and `wait` is False. flock dies with its process, so a crashed finaliser leaves no stale lock.
    The file stays (empty) in every run, one-process ones included, so directories compare equal."""
    path = out_dir / ".build" / "finalize.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def missing_reports(out_dir: str | Path, shards: list[ShardInfo]) -> list[str]:
    """Names of the shards whose per-shard report is not in OUT/.build yet."""
    return [sh.name for sh in shards if not report_path(Path(out_dir), sh).is_file()]


def finalize(encoder: ImageEncoder, ckpt: str | Path, in_dir: str | Path, out_dir: str | Path, fingerprint: str,
             progress: bool = False, wait: bool = False) -> dict[str, Any] | None:
    """Merge the per-shard reports and write energon's index, the janus meta and
    `build_report.json` (last, atomically: its presence means the dataset is complete), if every
    shard is done and no other process is doing it. Returns the summary, or None when shards are
    missing or another process holds the lock (`wait`: wait for it instead). Idempotent: a
    dataset that is already final is left untouched."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    shards = sorted_shards(in_dir)
    if missing_reports(out_dir, shards):
        return None
    (out_dir / ".build").mkdir(parents=True, exist_ok=True)
    with _finalize_lock(out_dir, wait) as mine:
        if not mine:
            return None
        # Merged in shard-name order, never in completion order: the same bytes whoever finishes last.
        reports = [json.loads(report_path(out_dir, sh).read_text()) for sh in shards]
        skipped: dict[str, int] = {}
        for r in reports:
            for k, v in r["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        summary = {
            "input": str(in_dir),
            "ckpt": str(ckpt),
            "rows": sum(r["rows"] for r in reports),
            "written": sum(r["written"] for r in reports),
            "skipped": skipped,
            "examples": [e for r in reports for e in r["examples"]][:MAX_EXAMPLES],
            **encoder.meta,
            "prompt_tokenizer": fingerprint,
        }
        if summary["written"] == 0:
            raise RuntimeError(f"no sample of {in_dir} could be encoded (skipped: {skipped})")
        janus = {
            "task": "gen",
            "source": read_janus_meta(in_dir).get("source"),
            "samples": summary["written"],
            "builder": f"pretokenize_{encoder.name}",
            **encoder.meta,
            "prompt_tokenizer": fingerprint,
        }
        text = json.dumps(summary, indent=2) + "\n"
        report = out_dir / "build_report.json"
        final = (report.is_file() and report.read_text() == text and (out_dir / ".nv-meta" / ".info.json").is_file()
                 and read_janus_meta(out_dir) == json.loads(json.dumps(janus)))
        if not final:
            report.unlink(missing_ok=True)  # incomplete until written again below
            prepare_energon(out_dir, progress=progress)
            write_janus_meta(out_dir, janus)
            _atomic_write(report, text)
    return summary


# ---- the driver ---------------------------------------------------------------------------------


def default_workers() -> int:
    """Decoding processes when --workers is not given: up to 4, leaving a CPU to the encoder."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def run(
    encoder: ImageEncoder,
    ckpt: str | Path,
    in_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 64,
    keep_image: bool = False,
    progress: bool = True,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    workers: int = 0,
    finalize_only: bool = False,
) -> dict[str, Any]:
    """Encode this process's shards of `in_dir` into `out_dir` (resumable); prompts with `ckpt`'s
    tokenizer. Returns the dataset summary (what `build_report.json` holds) with "finalized":
    True when this process wrote or found the final dataset, else {"finalized": False}; either
    way "process" has this process's figures (rank, world size, shards, rows, seconds, images/s).
    `finalize_only`: encode nothing, merge (waiting for a finaliser that is running); an error
    if a shard is not done."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if in_dir.resolve() == out_dir.resolve():
        raise ValueError(f"--out must differ from --in ({in_dir})")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    slot = resolve_process_slot(rank, world_size)
    shards = sorted_shards(in_dir)
    (out_dir / ".build").mkdir(parents=True, exist_ok=True)
    tok = TokenizerInfo.from_hf(str(ckpt))
    stats: dict[str, Any] = {"rank": slot.rank, "world_size": slot.world_size, "source": slot.source,
                             "shards": 0, "rows": 0, "written": 0, "seconds": 0.0, "images_per_s": None}
    if not finalize_only:
        mine = shards_for(shards, slot)
        todo = [sh for sh in mine if not report_path(out_dir, sh).is_file()]
        bar = tqdm(total=sum(s.count for s in mine), desc=f"{encoder.name} encode" + (f" [{slot.rank}/{slot.world_size}]" if slot.world_size > 1 else ""),
                   unit="img", disable=not progress)
        bar.update(sum(s.count for s in mine if s not in todo))
        t0 = time.perf_counter()
        reports = encode_shards(encoder, tok, todo, out_dir, batch_size, keep_image, workers, bar)
        bar.close()
        seconds = time.perf_counter() - t0
        rows = sum(r["rows"] for r in reports)
        stats.update(shards=len(reports), rows=rows, written=sum(r["written"] for r in reports), seconds=round(seconds, 3),
                     images_per_s=round(rows / seconds, 2) if rows and seconds > 0 else None)
    summary = finalize(encoder, ckpt, in_dir, out_dir, tok.fingerprint, progress=progress, wait=finalize_only)
    if summary is None:
        missing = missing_reports(out_dir, shards)
        if finalize_only:
            raise RuntimeError(f"{out_dir}: {len(missing)} of {len(shards)} shards are not done yet (no report in "
                               f"{out_dir / '.build'}), e.g. {', '.join(missing[:3])}; run the encoding for them first")
        stats["waiting_for"] = len(missing)
        return {"finalized": False, "process": stats}
    return {**summary, "finalized": True, "process": stats}


def local_device(device: str) -> str:
    """`cuda` under torchrun means this process's GPU, LOCAL_RANK; anything else is kept (a
    Slurm array task sees only its own GPU, so plain `cuda` is right there)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def add_distributed_args(p: Any) -> None:
    """--rank/--world-size, --workers and --finalize-only, shared by pretokenize_vq and _vae."""
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: torchrun's RANK, a Slurm array task, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of processes sharing the shards (with --rank)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"image-decoding processes (default here: {default_workers()}, i.e. min(4, CPUs - 1)); 0 decodes in this process")
    p.add_argument("--finalize-only", action="store_true",
                   help="encode nothing: write the dataset-level files once every shard is done (fails if one is not)")


def report_result(s: dict[str, Any], out: str | Path) -> None:
    """The CLIs' last lines: this process's throughput, then the dataset's totals if final."""
    pr = s["process"]
    if pr["rows"]:
        print(f"rank {pr['rank']} of {pr['world_size']}: {pr['rows']} images from {pr['shards']} shards in {pr['seconds']:.1f} s, "
              f"{pr['images_per_s']:.1f} images/s")
    if s["finalized"]:
        print(f"encoded {s['written']} of {s['rows']} samples to {out}; skipped {s['skipped'] or 0}")
    else:
        if pr["waiting_for"]:
            print(f"{out}: {pr['waiting_for']} shards still to do by other processes; the last to finish writes "
                  "build_report.json and the index (or run again with --finalize-only)")
        else:
            print(f"{out}: every shard is done; another process is writing build_report.json and the index")
