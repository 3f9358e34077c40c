"""Build WebDataset tar shards of one task from a JSONL manifest or a dataset in a common
format; the output directory is also a megatron-energon dataset (`.nv-meta/`), so energon's
tools work on it.

    python -m data_pipelines.build_shards --task {und,text,gen} --input PATH --out DIR
        [--format auto|jsonl|llava|swift|sharegpt|folder|parquet|energon] [--image-root DIR]
        [--image-column C] [--text-column C] [--conversations-column C] [--key-column C]
        [--split NAME] [--shard-size N] [--workers K] [--source NAME] [--und-resize PX]

Manifest rows (--format jsonl; file paths are relative to --image-root, by default the
manifest's directory, unless absolute):
    und   {"image": path, "conversations": [{"role", "content"}, ...], "system"?: str, "key"?: str}
    text  {"text": str} or {"conversations": [...], "system"?: str}, "key"?: str
    gen   {"caption": str, "image": path | "codes": path-to-.npy, "source"?: str, "key"?: str}
The other formats (LLaVA and ms-swift JSON, ShareGPT, a folder of images with .txt captions,
parquet / HuggingFace datasets, energon datasets) are read by `input_formats`, which turns
each record into such a row; `--format auto` (the default) detects the format and says which.

Record i of the input (line i of a manifest) goes to shard i // shard-size, so the layout is
fixed by the input alone. A shard counts as done once its report `DIR/.build/<shard>.json`
exists (written after the tar is renamed into place), so an interrupted build resumes where it
stopped. Bad rows (unparsable line, missing file, undecodable image, empty caption or text, bad
conversation) are skipped, counted per reason and listed in `DIR/build_report.json` with their
1-based line (record) number; never dropped silently. A missing or empty input is an error
(one line, exit status 2) that writes nothing.
Images are stored as they are (JPEG/PNG/WebP bytes untouched; other formats re-encoded as PNG).
`--und-resize PX` (und only) instead stores each image already resized to the model's und size
(long side PX, exactly the loader's bicubic resize) as lossless PNG: the loader's resize is then
a no-op, so training reads the same pixels for about a third of the CPU (the resize is the
costliest step of the und path), at the price of one shard set per image size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data_pipelines import input_formats
from data_pipelines.input_formats import Columns, InputError
from janus_train.data import formats as fmt
from janus_train.data.shards import prepare_energon, write_janus_meta

TASKS = ("und", "text", "gen")
PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_EXAMPLES = 200
_KEY_OK = re.compile(r"[^A-Za-z0-9_\-]")


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _image(src: Path | bytes) -> tuple[str, bytes]:
    """(extension, bytes) to store for an image file, or for image bytes read from a table."""
    if isinstance(src, (bytes, bytearray)):
        raw, name = bytes(src), "image bytes"
    else:
        if not src.is_file():
            raise fmt.SampleError("missing_file", str(src))
        raw, name = src.read_bytes(), str(src)
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except Exception as e:
        raise fmt.SampleError("bad_image", f"{name}: {type(e).__name__}: {e}"[:300]) from None
    ext = PIL_EXT.get(img.format or "")
    if ext is None:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "PNG")
        return "png", buf.getvalue()
    return ext, raw


def _path(base: Path, p: Any, field: str) -> Path | bytes:
    if isinstance(p, (bytes, bytearray)) and p:  # image bytes from parquet / energon inputs
        return bytes(p)
    if not isinstance(p, str) or not p:
        raise fmt.SampleError("missing_key", f"row has no '{field}' path")
    q = Path(p)
    return q if q.is_absolute() else base / q


def _resized_png(path: Path | bytes, size: int) -> tuple[str, bytes]:
    from janus_train.contracts.preprocess import und_resize

    _, raw = _image(path)  # same checks and skip reasons as the plain path
    arr = und_resize(Image.open(io.BytesIO(raw)).convert("RGB"), size)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=6)
    return "png", buf.getvalue()


def make_sample(task: str, row: dict[str, Any], base: Path, source: str | None, und_resize: int | None = None) -> dict[str, bytes]:
    """The tar members (part -> bytes) of one manifest row; raises formats.SampleError."""
    if task == "und":
        turns = fmt.get_conversation(row)
        # A question's `type` (color, count, ...) is kept for per-type evaluation.
        for turn, raw in zip(turns, row.get("conversations", row.get("messages")) or []):
            if isinstance(raw, dict) and isinstance(raw.get("type"), str):
                turn["type"] = raw["type"]
        meta: dict[str, Any] = {"conversations": turns}
        if isinstance(row.get("question_type"), str):
            meta["question_type"] = row["question_type"]
        if row.get("system"):
            meta["system"] = row["system"]
        if source:
            meta["source"] = source
        path = _path(base, row.get("image"), "image")
        ext, raw = _resized_png(path, und_resize) if und_resize else _image(path)
        return {ext: raw, "json": json.dumps(meta).encode()}
    if task == "text":
        if "text" in row:
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise fmt.SampleError("empty_text", "empty text")
            return {"txt": row["text"].encode("utf-8")}
        turns = fmt.get_conversation(row)
        meta = {"conversations": turns}
        if row.get("system"):  # the loader renders a text chat's system prompt too
            meta["system"] = row["system"]
        return {"json": json.dumps(meta).encode()}
    if task == "gen":
        cap = fmt.get_caption(row)
        meta = {"caption": cap, "source": source or row.get("source") or "unknown"}
        if "codes" in row:
            codes_path = _path(base, row["codes"], "codes")
            if not isinstance(codes_path, Path):
                raise fmt.SampleError("missing_key", "'codes' must be a path to a .npy file")
            codes = fmt.load_npy(codes_path.read_bytes())
            return {"json": json.dumps(meta).encode(), fmt.CODES_PART: fmt.npy_bytes(codes)}
        ext, raw = _image(_path(base, row.get("image"), "image"))
        return {ext: raw, "json": json.dumps(meta).encode()}
    raise ValueError(f"unknown task {task!r}")


def _key(row: dict[str, Any], index: int, prefix: str) -> str:
    k = row.get("key")
    # energon splits member names at the first dot: keys must not contain one
    return _KEY_OK.sub("_", str(k)) if k else f"{prefix}-{index:09d}"


# One shard's work: (task, image root, out dir, shard index, its (0-based input index, record)
# pairs, source, und_resize, the record -> manifest row converter).
Job = tuple[str, Path, Path, int, list[tuple[int, Any]], str | None, int | None, input_formats.Converter]


def build_shard(job: Job) -> dict[str, Any]:
    """Write one shard from its input records; returns (and saves) its report."""
    import webdataset as wds

    task, base, out, index, lines, source, und_resize, convert = job
    name = shard_name(index)
    report: dict[str, Any] = {"shard": name, "rows": len(lines), "written": 0, "skipped": {}, "examples": []}
    tmp = out / (name + ".tmp")
    prefix = re.sub(r"[^A-Za-z0-9]", "", source or task) or task
    seen: set[str] = set()
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as w:
        for line_no, record in lines:
            try:
                row = convert(record)
                key = _key(row, line_no, prefix)
                if key in seen:
                    key = f"{key}-{line_no}"
                seen.add(key)
                sample = make_sample(task, row, base, source, und_resize)
            except fmt.SampleError as e:
                report["skipped"][e.reason] = report["skipped"].get(e.reason, 0) + 1
                if len(report["examples"]) < MAX_EXAMPLES:
                    # 1-based, as editors and `sed -n Np` count lines (the key keeps the 0-based index)
                    report["examples"].append({"line": line_no + 1, "reason": e.reason, "detail": e.detail})
                continue
            w.write({"__key__": key, **sample})
            report["written"] += 1
    build_dir = out / ".build"
    if report["written"] == 0:
        tmp.unlink()  # energon refuses empty shards
    else:
        os.replace(tmp, out / name)
    rep_tmp = build_dir / (name + ".json.tmp")
    rep_tmp.write_text(json.dumps(report) + "\n")
    os.replace(rep_tmp, build_dir / (name + ".json"))
    return report


class NoUsableRows(RuntimeError):
    """Every row of the input was skipped (the report in the output directory says why)."""


def _chunks(records: Iterator[tuple[int, Any]], size: int) -> Iterator[list[tuple[int, Any]]]:
    chunk: list[tuple[int, Any]] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build(
    task: str,
    manifest: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    workers: int = 1,
    source: str | None = None,
    progress: bool = True,
    und_resize: int | None = None,
    input_format: str = "auto",
    image_root: str | Path | None = None,
    columns: Columns | None = None,
    split: str = "train",
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Build the shards of `manifest` (any input_formats format) into `out`; returns the report.
    Raises InputError, before anything is written, when the input as a whole is unusable.
    `log` (the CLI's print) is told the detected format when `input_format` is "auto"."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r} must be one of {TASKS}")
    if und_resize is not None and (task != "und" or und_resize < 14):
        raise ValueError(f"--und-resize {und_resize} needs --task und and a size >= 14")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    manifest, out = Path(manifest), Path(out)
    inp = input_formats.open_input(manifest, task, input_format, columns, split)
    if input_format == "auto" and log is not None:
        log(f"input format: {inp.format} ({inp.why}); pass --format to override")
    base = Path(image_root) if image_root is not None else inp.base
    created = not out.exists()
    (out / ".build").mkdir(parents=True, exist_ok=True)
    reports: list[dict[str, Any]] = []
    bar = tqdm(total=inp.total, desc=f"build {task} shards", unit="row", disable=not progress)

    def jobs() -> Iterator[Job]:
        # Records are read lazily, shard by shard: a parquet or energon input never has to fit
        # in memory. A finished shard's records are read and dropped (its report stands).
        for i, chunk in enumerate(_chunks(inp.records, shard_size)):
            rep = out / ".build" / (shard_name(i) + ".json")
            if rep.is_file():
                reports.append(json.loads(rep.read_text()))
                bar.update(len(chunk))
            else:
                yield (task, base, out, i, chunk, source, und_resize, inp.converter)

    built = 0
    try:
        if workers > 1:
            with get_context("fork").Pool(workers) as pool:
                # At most two shards per worker in flight, so reading stays just ahead of writing.
                pending: deque[Any] = deque()
                for job in jobs():
                    pending.append(pool.apply_async(build_shard, (job,)))
                    while len(pending) >= 2 * workers or (pending and pending[0].ready()):
                        reports.append(r := pending.popleft().get())
                        bar.update(r["rows"])
                        built += 1
                while pending:
                    reports.append(r := pending.popleft().get())
                    bar.update(r["rows"])
                    built += 1
        else:
            for job in jobs():
                reports.append(r := build_shard(job))
                bar.update(r["rows"])
                built += 1
    except InputError:
        if created:  # a failure found while reading (e.g. an energon sample type we do not read)
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        bar.close()
        # An unfinished reader (an error mid-input) holds energon's loader open: close it now,
        # not at interpreter exit.
        inp.records.close()
    reports.sort(key=lambda r: r["shard"])
    skipped: dict[str, int] = {}
    examples: list[dict[str, Any]] = []
    for r in reports:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        examples.extend({"shard": r["shard"], **e} for e in r["examples"])
    summary = {
        "task": task,
        "source": source,
        "manifest": str(manifest),
        "format": inp.format,
        "rows": sum(r["rows"] for r in reports),
        "written": sum(r["written"] for r in reports),
        "shards": sum(1 for r in reports if r["written"]),
        "skipped": skipped,
        "examples": examples[:MAX_EXAMPLES],
    }
    if summary["written"] == 0:
        (out / "build_report.json").write_text(json.dumps(summary, indent=2) + "\n")  # says why
        raise NoUsableRows(f"no usable rows in {manifest} (skipped: {skipped}; report: {out / 'build_report.json'})")
    if built or not (out / ".nv-meta" / ".info.json").is_file():
        prepare_energon(out, workers=max(1, workers), progress=progress)
    meta = {"task": task, "source": source, "samples": summary["written"], "builder": "build_shards"}
    if und_resize:
        meta["und_resized_to"] = und_resize
    write_janus_meta(out, meta)
    (out / "build_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--input", required=True, help="JSONL manifest, or a file or directory in another --format")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--format", default="auto", choices=("auto", *input_formats.FORMATS),
                   help="input format (default auto: detected from the input, and printed)")
    p.add_argument("--image-root", default=None,
                   help="directory that relative image paths start from (default: the input's directory; LLaVA's --image_folder)")
    p.add_argument("--image-column", default=None, help=f"parquet/datasets image column (default: first of {', '.join(input_formats.IMAGE_COLUMNS)})")
    p.add_argument("--text-column", default=None,
                   help=f"parquet/datasets text or caption column (default: first of {', '.join(input_formats.TEXT_COLUMNS)})")
    p.add_argument("--conversations-column", default=None,
                   help=f"parquet/datasets chat column (default: first of {', '.join(input_formats.CONVERSATION_COLUMNS)})")
    p.add_argument("--key-column", default=None, help=f"parquet/datasets sample key column (default: first of {', '.join(input_formats.KEY_COLUMNS)})")
    p.add_argument("--split", default="train", help="split of a datasets DatasetDict or an energon dataset (default train)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards (default 1)")
    p.add_argument("--source", default=None, help="source name stored in the samples (e.g. real, synthetic)")
    p.add_argument("--und-resize", type=int, default=None,
                   help="und only: store images pre-resized to this long side (the model's und size, e.g. 384) as lossless PNG")
    args = p.parse_args(argv)
    columns = Columns(args.image_column, args.text_column, args.conversations_column, args.key_column)
    try:
        s = build(args.task, args.input, args.out, args.shard_size, args.workers, args.source, und_resize=args.und_resize,
                  input_format=args.format, image_root=args.image_root, columns=columns, split=args.split,
                  log=lambda line: print(line, flush=True))
    except (InputError, NoUsableRows) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{s['written']} of {s['rows']} rows in {s['shards']} shards at {args.out}; "
        f"skipped {sum(s['skipped'].values())} {s['skipped'] or ''} (report: {Path(args.out) / 'build_report.json'})"
    )


if __name__ == "__main__":
    main()
