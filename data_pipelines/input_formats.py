"""Readers for the input formats `build_shards --format` accepts; each turns its input into the
manifest rows of `build_shards` (see its docstring), so the shard writer has one row schema.

    jsonl     our manifest: one JSON object a line in build_shards' row schema
    llava     LLaVA instruction data: a .json list (or .jsonl) of
              {"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": "<image>\\n..."}]}
    swift     ms-swift JSONL: {"messages": [{"role": "system"|"user"|"assistant", "content"}],
              "images"?: [path | {"bytes", "path"}]}
    sharegpt  ShareGPT chats without images: {"conversations": [{"from": "system"|"human"|"gpt",
              "value"}]} (or "messages" of role/content)
    folder    a directory of images, each with a same-named .txt caption (a.jpg + a.txt)
    parquet   .parquet files, or a HuggingFace `datasets` dataset saved with `save_to_disk`: an
              image column (datasets.Image's {"bytes", "path"} struct, raw binary or a path),
              a text column and/or a conversations column
    energon   a megatron-energon dataset of CaptioningSample, VQASample or TextSample

Reading happens in two halves. `open_input` runs once in the main process: it checks the input
as a whole (missing, empty, unknown layout, a task the format cannot feed), which raises
InputError naming the path, and returns the raw records in input order. `Converter` runs in the
shard workers on each record and raises formats.SampleError for a bad one, so bad records are
skipped and counted per reason like bad manifest lines, and conversion runs in parallel.

A conversation's "<image>" marker (conversation.IMAGE_SLOT, the same string as LLaVA's and
ms-swift's tag) is kept where it is: our und samples use it to place the image, and put the
image before the first user turn when there is none. An und sample holds exactly one image.
"""

from __future__ import annotations

import functools
import io
import json
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from janus_train.contracts.conversation import IMAGE_SLOT
from janus_train.data import formats as fmt

FORMATS = ("jsonl", "llava", "swift", "sharegpt", "folder", "parquet", "energon")
# Which tasks each format can feed; anything else is refused before a shard is written.
FORMAT_TASKS: dict[str, tuple[str, ...]] = {
    "jsonl": ("und", "text", "gen"),
    "llava": ("und", "text"),
    "swift": ("und", "text"),
    "sharegpt": ("text",),
    "folder": ("gen", "und"),
    "parquet": ("und", "text", "gen"),
    "energon": ("und", "text", "gen"),
}
# Column names tried in order when --image-column / --text-column / --conversations-column
# are not given (the names of the common HuggingFace image-text datasets).
IMAGE_COLUMNS = ("image", "images", "img", "jpg", "png")
TEXT_COLUMNS = ("text", "caption", "prompt", "txt")
CONVERSATION_COLUMNS = ("conversations", "messages")
KEY_COLUMNS = ("id", "key", "__key__")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The user turn of an und sample made from a caption (folder, parquet or energon captions).
CAPTION_QUESTION = "Describe this image."
# Chat roles of the published schemas -> ours ("system" goes to the sample's "system" field).
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_BATCH_ROWS = 256  # arrow rows decoded at a time: bounds memory whatever the dataset size


class InputError(Exception):
    """The input as a whole cannot be read (missing, empty, unknown layout, wrong task)."""


@dataclass(frozen=True)
class Columns:
    """Table columns to read (parquet / datasets); None = detect from the common names."""

    image: str | None = None
    text: str | None = None
    conversations: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Converter:
    """Turns one raw record of `format` into a manifest row for `task`; picklable, so it travels
    to the shard workers. Raises formats.SampleError for a record that cannot be used."""

    format: str
    task: str
    columns: Columns = Columns()

    def __call__(self, record: Any) -> dict[str, Any]:
        if isinstance(record, str):  # a line of a JSONL file, parsed here so bad lines are counted
            try:
                record = json.loads(record)
            except ValueError as e:
                raise fmt.SampleError("bad_json", str(e)[:200]) from None
        if not isinstance(record, dict):
            raise fmt.SampleError("bad_json", "manifest row is not a json object")
        if self.format == "jsonl":
            return record
        if self.format in ("llava", "swift", "sharegpt"):
            return _chat_row(record, self.task)
        if self.format == "folder":
            return _caption_row(self.task, record["image"], _read_caption(record["caption"]), record["key"])
        if self.format == "parquet":
            return _table_row(record, self.task, self.columns)
        if self.format == "energon":
            return _energon_row(record, self.task)
        raise ValueError(f"unknown format {self.format!r}")


@dataclass
class Input:
    """An opened input: its format (and why, when detected), where relative image paths start,
    the number of records when known, and the records as (0-based index, record) in order."""

    format: str
    why: str
    base: Path
    total: int | None
    records: Generator[tuple[int, Any], None, None]
    converter: Converter


# ---- detection ------------------------------------------------------------------------------


def detect_format(path: str | Path) -> tuple[str, str]:
    """(format, why) of an input, from its layout and, for JSON, its first row."""
    path = Path(path)
    if path.is_dir():
        if (path / ".nv-meta" / "dataset.yaml").is_file():
            return "energon", "a directory with .nv-meta/dataset.yaml"
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "parquet", "a HuggingFace datasets directory (save_to_disk)"
        if next(path.rglob("*.parquet"), None) is not None:
            return "parquet", "a directory of .parquet files"
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
            return "folder", "a directory of images"
        raise InputError(f"--input {path}: cannot tell the format of this directory (no images, .parquet or .nv-meta); pass --format")
    if not path.is_file():
        raise InputError(f"--input {path}: no such file or directory")
    if path.suffix == ".parquet":
        return "parquet", "a .parquet file"
    first = next((r for _, r in _json_records(path) if isinstance(r, dict)), None)
    if first is None:
        return "jsonl", "no JSON object in its first rows"
    return _row_format(first)


def _row_format(row: dict[str, Any]) -> tuple[str, str]:
    turns = row.get("conversations", row.get("messages"))
    first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
    if "from" in first:
        if "image" in row or "images" in row:
            return "llava", "rows of 'conversations' with 'from'/'value' turns and an 'image'"
        return "sharegpt", "rows of 'conversations' with 'from'/'value' turns and no image"
    if "messages" in row and "image" not in row:
        return "swift", "rows of 'messages' with 'role'/'content' turns"
    return "jsonl", "rows in the build_shards manifest schema"


def _json_records(path: Path, limit: int = 16) -> Iterator[tuple[int, Any]]:
    """The first records of a .json list or a JSONL file (detection only)."""
    if path.suffix == ".json":
        for i, r in enumerate(_load_json_list(path)[:limit]):
            yield i, r
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= limit:
                return
            try:
                yield i, json.loads(line)
            except ValueError:
                continue


def _load_json_list(path: Path) -> list[Any]:
    st = path.stat()
    return _parse_json_list(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _parse_json_list(path: str, mtime_ns: int, size: int) -> list[Any]:
    # Cached (keyed by the file's mtime and size) because detection and reading both need it and
    # a LLaVA mix is a single JSON list of hundreds of MB.
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"--input {path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, list):
        raise InputError(f"--input {path}: expected a JSON list of rows, got a {type(data).__name__}")
    return data


# ---- opening --------------------------------------------------------------------------------


def open_input(
    path: str | Path,
    task: str,
    format: str = "auto",
    columns: Columns | None = None,
    split: str = "train",
) -> Input:
    """Open `path` as `format` ("auto": detect_format) for `task`; raises InputError when the
    input as a whole is unusable, so nothing is written for it."""
    path, columns = Path(path), columns or Columns()
    if not path.exists():
        raise InputError(f"--input {path}: no such file or directory")
    why = f"--format {format}"
    if format == "auto":
        format, why = detect_format(path)
    if format not in FORMATS:
        raise InputError(f"--format {format!r} must be auto or one of {', '.join(FORMATS)}")
    if task not in FORMAT_TASKS[format]:
        raise InputError(f"--format {format} cannot feed --task {task} (it feeds {', '.join(FORMAT_TASKS[format])})")
    base = path if path.is_dir() else path.parent
    if format in ("jsonl", "llava", "swift", "sharegpt"):
        total, records = _open_json(path, format)
    elif format == "folder":
        total, records = _open_folder(path)
    elif format == "parquet":
        total, records, columns = _open_table(path, task, columns, split)
    else:
        total, records = _open_energon(path, task, split)
    # Peek one record so an empty input fails here, before an output directory exists.
    first = next(records, None)
    if first is None:
        raise InputError(f"--input {path}: empty (no rows)")
    return Input(format, why, base, total, _chain(first, records), Converter(format, task, columns))


def _chain(first: Any, rest: Iterator[Any]) -> Generator[Any, None, None]:
    yield first
    yield from rest


def _open_json(path: Path, format: str) -> tuple[int, Iterator[tuple[int, Any]]]:
    if path.is_dir():
        raise InputError(f"--input {path}: --format {format} reads a file, not a directory")
    if path.suffix == ".json":
        rows = _load_json_list(path)
        return len(rows), iter(enumerate(rows))
    # JSONL lines stay text: the shard worker parses them, counting bad lines as bad_json. The
    # index is the 0-based line number (blank lines skipped), so reports and keys name the line.
    with open(path, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f) if line.strip()]
    return len(lines), iter(lines)


def _open_folder(path: Path) -> tuple[int, Iterator[tuple[int, Any]]]:
    if not path.is_dir():
        raise InputError(f"--input {path}: --format folder reads a directory")
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    # Absolute paths: relative ones would be read against --image-root (the folder itself by
    # default), which doubles a relative --input.
    records = [
        {"image": str(p.resolve()), "caption": str(p.with_suffix(".txt").resolve()), "key": p.relative_to(path).with_suffix("").as_posix()}
        for p in images
    ]
    return len(records), iter(enumerate(records))


def _open_table(path: Path, task: str, columns: Columns, split: str) -> tuple[int, Iterator[tuple[int, Any]], Columns]:
    """Arrow record batches of parquet files or a save_to_disk dataset, as row dicts."""
    import pyarrow.parquet as pq

    if path.is_dir() and not next(path.rglob("*.parquet"), None):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--input {path}: not a parquet directory nor a datasets save_to_disk directory ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"--input {path}: no split {split!r} (splits: {', '.join(ds)}); pass --split")
            ds = ds[split]
        names = list(ds.column_names)
        cols = _resolve_columns(path, task, names, columns)
        wanted = [c for c in (cols.image, cols.text, cols.conversations, cols.key) if c]
        # The arrow format hands out the stored cells (image structs with their bytes), never
        # decoded PIL images.
        table = ds.select_columns(wanted).with_format("arrow")
        batches: Iterator[Any] = table.iter(batch_size=_BATCH_ROWS)
        total = len(ds)
    else:
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        try:
            pfs = [pq.ParquetFile(f) for f in files]
        except Exception as e:  # noqa: BLE001 -- pyarrow raises ArrowInvalid & co for a file that is not parquet
            raise InputError(f"--input {path}: cannot read parquet ({type(e).__name__}: {str(e)[:200]})") from None
        names = list(pfs[0].schema_arrow.names)
        cols = _resolve_columns(path, task, names, columns)
        wanted = [c for c in (cols.image, cols.text, cols.conversations, cols.key) if c]
        batches = (b for pf in pfs for b in pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted))
        total = sum(pf.metadata.num_rows for pf in pfs)

    def rows() -> Iterator[tuple[int, Any]]:
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield i, row
                i += 1

    return total, rows(), cols


def _resolve_columns(path: Path, task: str, names: list[str], given: Columns) -> Columns:
    def pick(flag: str, value: str | None, candidates: tuple[str, ...]) -> str | None:
        if value is not None:
            if value not in names:
                raise InputError(f"--input {path}: {flag} {value!r} is not a column (columns: {', '.join(names)})")
            return value
        return next((c for c in candidates if c in names), None)

    cols = Columns(
        image=pick("--image-column", given.image, IMAGE_COLUMNS),
        text=pick("--text-column", given.text, TEXT_COLUMNS),
        conversations=pick("--conversations-column", given.conversations, CONVERSATION_COLUMNS),
        key=pick("--key-column", given.key, KEY_COLUMNS),
    )
    have = f"(columns: {', '.join(names)})"
    if task in ("und", "gen") and cols.image is None:
        raise InputError(f"--input {path}: no image column among {', '.join(IMAGE_COLUMNS)} {have}; pass --image-column")
    if task == "gen" and cols.text is None:
        raise InputError(f"--input {path}: no caption column among {', '.join(TEXT_COLUMNS)} {have}; pass --text-column")
    if task in ("und", "text") and cols.text is None and cols.conversations is None:
        raise InputError(
            f"--input {path}: no conversations column ({', '.join(CONVERSATION_COLUMNS)}) nor text column "
            f"({', '.join(TEXT_COLUMNS)}) {have}; pass --conversations-column or --text-column"
        )
    return cols


# The energon sample types we read, and the tasks each feeds.
ENERGON_TASKS = {"CaptioningSample": ("gen", "und"), "VQASample": ("und",), "TextSample": ("text",)}


def _open_energon(path: Path, task: str, split: str) -> tuple[int | None, Iterator[tuple[int, Any]]]:
    """Samples of an energon dataset, read once in order by energon's own loader."""
    import webdataset
    from megatron.energon import (
        DefaultTaskEncoder,
        SampleDecoder,
        WorkerConfig,
        get_loader,
        get_val_dataset,
    )

    class _RawImageDecoder(SampleDecoder):
        # energon's decoder with no image handler: text and json parts are decoded as usual,
        # images stay the stored bytes (build_shards keeps JPEG/PNG/WebP bytes untouched).
        def __init__(self) -> None:
            super().__init__()
            self._decoder = webdataset.autodecode.Decoder([])

    class _Encoder(DefaultTaskEncoder):
        decoder = _RawImageDecoder()

    try:
        ds = get_val_dataset(
            str(path),
            split_part=split,
            worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
            batch_size=None,
            task_encoder=_Encoder(),
        )
    except Exception as e:  # noqa: BLE001 -- energon raises many kinds for a dataset it cannot open
        raise InputError(f"--input {path}: energon cannot open it ({type(e).__name__}: {str(e)[:300]})") from None

    def rows() -> Iterator[tuple[int, Any]]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")  # torch's, on CPU machines
            for i, sample in enumerate(get_loader(ds)):
                kind = type(sample).__name__
                if kind not in ENERGON_TASKS:
                    raise InputError(f"--input {path}: energon sample type {kind} is not read (supported: {', '.join(ENERGON_TASKS)})")
                if task not in ENERGON_TASKS[kind]:
                    raise InputError(f"--input {path}: {kind} samples cannot feed --task {task} (they feed {', '.join(ENERGON_TASKS[kind])})")
                yield i, _energon_record(kind, sample)

    return len(ds) if hasattr(ds, "__len__") else None, rows()


def _energon_record(kind: str, sample: Any) -> dict[str, Any]:
    """The picklable fields of an energon sample (no tensors cross to the workers)."""
    rec: dict[str, Any] = {"type": kind, "key": sample.__key__}
    if kind == "TextSample":
        rec["text"] = _as_text(sample.text)
        return rec
    rec["image"] = _image_bytes(sample.image)
    if kind == "CaptioningSample":
        rec["caption"] = _as_text(sample.caption)
    else:
        rec["context"] = _as_text(sample.context)
        answers = sample.answers or []
        answers = [answers] if isinstance(answers, (str, bytes)) else list(answers)
        weights = sample.answer_weights
        if answers and weights is not None and len(weights) == len(answers):
            # VQA datasets list several annotators' answers; train on the most agreed one.
            answers = [answers[max(range(len(answers)), key=lambda j: float(weights[j]))]]
        rec["answers"] = [_as_text(a) for a in answers]
    return rec


def _as_text(v: Any) -> Any:
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v


def _image_bytes(image: Any) -> Any:
    """Stored bytes as they are; a decoded image (a dataset whose own loader decodes) as PNG."""
    if isinstance(image, (bytes, bytearray)) or image is None:
        return image
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # energon's torch images are [C, H, W]
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)  # energon's float images are in [0, 1]
        image = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# ---- conversion (in the shard workers) ------------------------------------------------------


def _turns(raw: Any) -> tuple[list[dict[str, str]], str | None]:
    """Our turns and the system prompt from from/value (LLaVA, ShareGPT) or role/content
    (ms-swift, OpenAI) turns."""
    if isinstance(raw, str):  # a conversations column stored as a JSON string
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise fmt.SampleError("bad_conversation", f"conversations is not JSON: {str(e)[:200]}") from None
    if not isinstance(raw, list) or not raw:
        raise fmt.SampleError("bad_conversation", "'conversations' must be a non-empty list")
    turns: list[dict[str, str]] = []
    system = None
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise fmt.SampleError("bad_conversation", f"turn {i} is not an object")
        role = _ROLES.get(t.get("from", t.get("role")))
        content = t.get("value", t.get("content"))
        if role is None or not isinstance(content, str):
            raise fmt.SampleError("bad_conversation", f"turn {i}: unknown role {t.get('from', t.get('role'))!r} or no text")
        if role == "system":
            system = content
        else:
            turns.append({"role": role, "content": content})
    return turns, system


def _images(value: Any) -> list[Any]:
    """Image references of a row: a path, bytes, a {"bytes", "path"} struct, or a list of them."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if isinstance(v, dict):  # datasets.Image's struct / ms-swift's dict form
            v = v.get("bytes") or v.get("path")
        if not isinstance(v, (str, bytes, bytearray)) or not v:
            raise fmt.SampleError("missing_key", f"an image entry of type {type(v).__name__} is neither a path nor bytes")
        if isinstance(v, str) and v.startswith(("http://", "https://")):
            raise fmt.SampleError("missing_file", f"{v}: URLs are not downloaded; fetch the images first")
        out.append(v)
    return out


def _conversation_row(task: str, turns: list[dict[str, str]], system: str | None, images: list[Any], key: Any) -> dict[str, Any]:
    """A manifest row of our und/text schema from a chat and its images."""
    row: dict[str, Any] = {"conversations": turns}
    if system:
        row["system"] = system
    if key is not None:
        row["key"] = str(key)
    slots = sum(t["content"].count(IMAGE_SLOT) for t in turns)
    if task == "text":
        if images or slots:
            raise fmt.SampleError("bad_conversation", "the row has an image: an und sample (build it with --task und)")
        return row
    if not images:
        raise fmt.SampleError("missing_key", "the row has no image: a text sample (build it with --task text)")
    if len(images) > 1 or slots > 1:
        raise fmt.SampleError("bad_conversation", f"{max(len(images), slots)} images: an und sample holds one")
    row["image"] = images[0]
    return row


def _chat_row(row: dict[str, Any], task: str) -> dict[str, Any]:
    turns, system = _turns(row.get("conversations", row.get("messages")))
    images = _images(row.get("images", row.get("image")))
    return _conversation_row(task, turns, system or row.get("system"), images, row.get("id"))


def _caption_row(task: str, image: Any, caption: Any, key: Any) -> dict[str, Any]:
    """A gen row, or for und the caption as the answer to CAPTION_QUESTION."""
    if not isinstance(caption, str) or not caption.strip():
        raise fmt.SampleError("empty_caption", "caption is empty")
    if task == "gen":
        return {"caption": caption.strip(), "image": image, "key": key}
    # No "<image>" marker: our und samples then put the image before the user's text.
    turns = [{"role": "user", "content": CAPTION_QUESTION}, {"role": "assistant", "content": caption.strip()}]
    return _conversation_row(task, turns, None, [image], key)


def _read_caption(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fmt.SampleError("missing_file", f"{path}: no caption file next to the image") from None
    except UnicodeDecodeError as e:
        raise fmt.SampleError("bad_text", f"{path}: {e}"[:300]) from None


def _table_row(row: dict[str, Any], task: str, cols: Columns) -> dict[str, Any]:
    key = row.get(cols.key) if cols.key else None
    images = _images(row.get(cols.image)) if cols.image else []
    if cols.conversations and row.get(cols.conversations) is not None and task != "gen":
        turns, system = _turns(row[cols.conversations])
        return _conversation_row(task, turns, system, images, key)
    text = row.get(cols.text) if cols.text else None
    if task == "text":
        if not isinstance(text, str) or not text.strip():
            raise fmt.SampleError("empty_text", f"column {cols.text!r} is empty")
        return {"text": text, **({"key": str(key)} if key is not None else {})}
    if len(images) != 1:
        raise fmt.SampleError("missing_key" if not images else "bad_conversation", f"{len(images)} images in column {cols.image!r}; a sample holds one")
    return _caption_row(task, images[0], text, None if key is None else str(key))


def _energon_row(rec: dict[str, Any], task: str) -> dict[str, Any]:
    kind, key = rec["type"], rec["key"]
    if kind == "TextSample":
        return {"text": rec["text"], "key": key}
    if kind == "CaptioningSample":
        return _caption_row(task, rec["image"], rec["caption"], key)
    if not rec["answers"]:
        raise fmt.SampleError("bad_conversation", "VQASample without answers (nothing to learn)")
    turns = [{"role": "user", "content": rec["context"]}, {"role": "assistant", "content": rec["answers"][0]}]
    return _conversation_row(task, turns, None, _images(rec["image"]), key)
