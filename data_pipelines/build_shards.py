"""Build WebDataset tar shards of one task from a JSONL manifest; the output directory is also
a megatron-energon dataset (`.nv-meta/`), so energon's tools work on it.

    python -m data_pipelines.build_shards --task {und,text,gen} --input MANIFEST.jsonl --out DIR
        [--shard-size N] [--workers K] [--source NAME] [--und-resize PX]

Manifest rows (file paths are relative to the manifest's directory unless absolute):
    und   {"image": path, "conversations": [{"role", "content"}, ...], "system"?: str, "key"?: str}
    text  {"text": str} or {"conversations": [...]}, "key"?: str
    gen   {"caption": str, "image": path | "codes": path-to-.npy, "source"?: str, "key"?: str}

Line i of the manifest goes to shard i // shard-size, so the layout is fixed by the manifest
alone. A shard counts as done once its report `DIR/.build/<shard>.json` exists (written after
the tar is renamed into place), so an interrupted build resumes where it stopped. Bad rows
(unparsable line, missing file, undecodable image, empty caption or text, bad conversation)
are skipped, counted per reason and listed in `DIR/build_report.json`; never dropped silently.
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
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from janus_train.data import formats as fmt
from janus_train.data.shards import prepare_energon, write_janus_meta

TASKS = ("und", "text", "gen")
PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_EXAMPLES = 200
_KEY_OK = re.compile(r"[^A-Za-z0-9_\-]")


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _image(path: Path) -> tuple[str, bytes]:
    if not path.is_file():
        raise fmt.SampleError("missing_file", str(path))
    raw = path.read_bytes()
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except Exception as e:
        raise fmt.SampleError("bad_image", f"{path}: {type(e).__name__}: {e}"[:300]) from None
    ext = PIL_EXT.get(img.format or "")
    if ext is None:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "PNG")
        return "png", buf.getvalue()
    return ext, raw


def _path(base: Path, p: Any, field: str) -> Path:
    if not isinstance(p, str) or not p:
        raise fmt.SampleError("missing_key", f"row has no '{field}' path")
    q = Path(p)
    return q if q.is_absolute() else base / q


def _resized_png(path: Path, size: int) -> tuple[str, bytes]:
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
        return {"json": json.dumps({"conversations": turns}).encode()}
    if task == "gen":
        cap = fmt.get_caption(row)
        meta = {"caption": cap, "source": source or row.get("source") or "unknown"}
        if "codes" in row:
            codes = fmt.load_npy(_path(base, row["codes"], "codes").read_bytes())
            return {"json": json.dumps(meta).encode(), fmt.CODES_PART: fmt.npy_bytes(codes)}
        ext, raw = _image(_path(base, row.get("image"), "image"))
        return {ext: raw, "json": json.dumps(meta).encode()}
    raise ValueError(f"unknown task {task!r}")


def _key(row: dict[str, Any], line: int, prefix: str) -> str:
    k = row.get("key")
    # energon splits member names at the first dot: keys must not contain one
    return _KEY_OK.sub("_", str(k)) if k else f"{prefix}-{line:09d}"


def build_shard(job: tuple[str, Path, Path, int, list[tuple[int, str]], str | None, int | None]) -> dict[str, Any]:
    """Write one shard from its manifest lines; returns (and saves) its report."""
    import webdataset as wds

    task, base, out, index, lines, source, und_resize = job
    name = shard_name(index)
    report: dict[str, Any] = {"shard": name, "rows": len(lines), "written": 0, "skipped": {}, "examples": []}
    tmp = out / (name + ".tmp")
    prefix = re.sub(r"[^A-Za-z0-9]", "", source or task) or task
    seen: set[str] = set()
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as w:
        for line_no, text in lines:
            try:
                try:
                    row = json.loads(text)
                except ValueError as e:
                    raise fmt.SampleError("bad_json", str(e)[:200]) from None
                if not isinstance(row, dict):
                    raise fmt.SampleError("bad_json", "manifest row is not a json object")
                key = _key(row, line_no, prefix)
                if key in seen:
                    key = f"{key}-{line_no}"
                seen.add(key)
                sample = make_sample(task, row, base, source, und_resize)
            except fmt.SampleError as e:
                report["skipped"][e.reason] = report["skipped"].get(e.reason, 0) + 1
                if len(report["examples"]) < MAX_EXAMPLES:
                    report["examples"].append({"line": line_no, "reason": e.reason, "detail": e.detail})
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


def build(
    task: str,
    manifest: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    workers: int = 1,
    source: str | None = None,
    progress: bool = True,
    und_resize: int | None = None,
) -> dict[str, Any]:
    if task not in TASKS:
        raise ValueError(f"--task {task!r} must be one of {TASKS}")
    if und_resize is not None and (task != "und" or und_resize < 14):
        raise ValueError(f"--und-resize {und_resize} needs --task und and a size >= 14")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    manifest, out = Path(manifest), Path(out)
    if not manifest.is_file():
        raise FileNotFoundError(f"--input {manifest}: no such file")
    (out / ".build").mkdir(parents=True, exist_ok=True)
    with open(manifest, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f) if line.strip()]
    chunks = [lines[a : a + shard_size] for a in range(0, len(lines), shard_size)]
    reports: list[dict[str, Any]] = []
    todo = []
    for i, chunk in enumerate(chunks):
        rep = out / ".build" / (shard_name(i) + ".json")
        if rep.is_file():
            reports.append(json.loads(rep.read_text()))
        else:
            todo.append((task, manifest.parent, out, i, chunk, source, und_resize))
    bar = tqdm(total=len(lines), desc=f"build {task} shards", unit="row", disable=not progress)
    bar.update(sum(r["rows"] for r in reports))
    if todo:
        if workers > 1:
            with get_context("fork").Pool(workers) as pool:
                for r in pool.imap_unordered(build_shard, todo):
                    reports.append(r)
                    bar.update(r["rows"])
        else:
            for job in todo:
                r = build_shard(job)
                reports.append(r)
                bar.update(r["rows"])
    bar.close()
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
        "rows": sum(r["rows"] for r in reports),
        "written": sum(r["written"] for r in reports),
        "shards": sum(1 for r in reports if r["written"]),
        "skipped": skipped,
        "examples": examples[:MAX_EXAMPLES],
    }
    if summary["written"] == 0:
        raise RuntimeError(f"no usable rows in {manifest} (skipped: {skipped})")
    if todo or not (out / ".nv-meta" / ".info.json").is_file():
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
    p.add_argument("--input", required=True, help="JSONL manifest")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards (default 1)")
    p.add_argument("--source", default=None, help="source name stored in the samples (e.g. real, synthetic)")
    p.add_argument("--und-resize", type=int, default=None,
                   help="und only: store images pre-resized to this long side (the model's und size, e.g. 384) as lossless PNG")
    args = p.parse_args(argv)
    s = build(args.task, args.input, args.out, args.shard_size, args.workers, args.source, und_resize=args.und_resize)
    print(
        f"{s['written']} of {s['rows']} rows in {s['shards']} shards at {args.out}; "
        f"skipped {sum(s['skipped'].values())} {s['skipped'] or ''} (report: {Path(args.out) / 'build_report.json'})"
    )


if __name__ == "__main__":
    main()
