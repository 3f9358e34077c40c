"""WebDataset shard directories with energon's index: making them energon datasets, and
random access to samples by (shard, index).

A dataset directory holds `*.tar` shards and `.nv-meta/` as written by `energon prepare`:
`.info.json` (samples per shard), `split.yaml`, `dataset.yaml` (our samples as energon's standard
sample types, through `sample_loader.py`; `crude.yaml`: as a CrudeWebdataset), and a
`<shard>.tar.idx` next to each shard (uint64 byte offset of every sample start, plus the end).
We read those offsets to seek straight to any sample, which is what makes exact resume and
re-reading the packer's look-ahead buffer cheap. Our own `.nv-meta/janus_dataset.json` records
the task and source the builder wrote.

Tar members are parsed here rather than with `tarfile`: a sample's bytes are read in one call
and the 512-byte ustar headers are decoded directly, which is several times faster per member
than `tarfile`'s object model (it matters at >20k gen samples/s). pax and GNU long-name
headers are understood, so shards written by other tools read too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from janus_train.data.formats import SampleError

log = logging.getLogger(__name__)

META_DIR = ".nv-meta"
JANUS_META = "janus_dataset.json"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # path relative to the dataset root, as energon records it
    path: str  # absolute path
    count: int


def dataset_shards(root: str | Path) -> list[ShardInfo]:
    """Shards of an energon-prepared dataset, in the order of its `.info.json`."""
    root = Path(root)
    meta = root / META_DIR
    info_json, info_yaml = meta / ".info.json", meta / ".info.yaml"
    if info_json.is_file():
        info = json.loads(info_json.read_text())
    elif info_yaml.is_file():
        import yaml

        info = yaml.safe_load(info_yaml.read_text())
    else:
        raise FileNotFoundError(
            f"{root}: no {META_DIR}/.info.json; build it with `python -m data_pipelines.build_shards` "
            f"or run `energon prepare {root} --non-interactive --split-ratio 1,0,0 --sample-type CrudeWebdataset`"
        )
    counts = info.get("shard_counts") or {}
    if not counts:
        raise ValueError(f"{root}: {META_DIR}/.info.json lists no shards")
    return [ShardInfo(name=name, path=str(root / name), count=int(n)) for name, n in counts.items() if int(n) > 0]


def read_janus_meta(root: str | Path) -> dict[str, Any]:
    p = Path(root) / META_DIR / JANUS_META
    return json.loads(p.read_text()) if p.is_file() else {}


def write_janus_meta(root: str | Path, meta: dict[str, Any]) -> None:
    import os

    p = Path(root) / META_DIR / JANUS_META
    p.parent.mkdir(parents=True, exist_ok=True)
    # tmp + replace: a reader (or a second writer) never sees a half-written file
    tmp = p.with_name(f"{JANUS_META}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)


# `.nv-meta/sample_loader.py` of every dataset we write: how energon's own tools and loaders
# (`energon info`, `energon lint`, `energon preview`, `get_train_dataset`) see our samples as its
# standard sample types. Self-contained (energon executes it; it must not need janus_train).
# Our loader never reads it: it reads `.info.json` and the `.tar.idx` offsets only.
ENERGON_SAMPLE_LOADER = '''"""Written by janus-train (janus_train/data/shards.py): our samples as energon sample types.

und  (image + json conversations) -> VQASample(image, context, answers): one user turn and one
     answer map directly; a multi-turn chat gives the turns before the last answer as context
     ("User: ..." / "Assistant: ..." lines) and the last answer. The "<image>" marker and
     the optional system prompt are left out.
gen  (image + json caption)       -> CaptioningSample(image, caption)
text (txt, or json text / chat)   -> TextSample(text)
gen pre-tokenised without its image (codes.npy) -> TextSample(text=caption): energon has no
     sample type for VQ codes; our loader reads them from the shard.
"""
import json

IMAGE_PARTS = ("jpg", "jpeg", "png", "webp")


def part_filter(part):
    return part in IMAGE_PARTS or part in ("json", "txt")


def _json(raw):
    j = raw.get("json")
    if isinstance(j, (bytes, bytearray)):
        j = j.decode("utf-8")
    if isinstance(j, str):
        j = json.loads(j)
    return j if isinstance(j, dict) else {}


def _text(v):
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _image(raw):
    for p in IMAGE_PARTS:
        if p in raw:
            return raw[p]
    raise KeyError("no image part (" + ", ".join(IMAGE_PARTS) + ")")


def _turns(conversations):
    return [(str(t.get("role", "")), str(t.get("content", "")).replace("<image>", "").strip()) for t in conversations]


def _chat_text(conversations):
    return "\\n".join(role.capitalize() + ": " + text for role, text in _turns(conversations))


def und(raw):
    turns = _turns(_json(raw)["conversations"])
    last = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
    before = turns[:last]
    if len(before) == 1 and before[0][0] == "user":
        context = before[0][1]
    else:
        context = "\\n".join(role.capitalize() + ": " + text for role, text in before)
    return dict(image=_image(raw), context=context, answers=[turns[last][1]])


def gen(raw):
    return dict(image=_image(raw), caption=str(_json(raw)["caption"]))


def gen_caption(raw):
    return dict(text=str(_json(raw)["caption"]))


def text(raw):
    if "txt" in raw:
        return dict(text=_text(raw["txt"]))
    j = _json(raw)
    return dict(text=str(j["text"]) if "text" in j else _chat_text(j["conversations"]))
'''

# sample kind -> (energon sample type, function of sample_loader.py)
ENERGON_SAMPLE_TYPES = {
    "und": ("VQASample", "und"),
    "gen": ("CaptioningSample", "gen"),
    "gen_caption": ("TextSample", "gen_caption"),
    "text": ("TextSample", "text"),
}
CRUDE_CONFIG = "crude.yaml"  # the same dataset as energon's CrudeWebdataset (for cookers)


def _energon_kind(root: Path, tars: list[str]) -> str | None:
    """Which of ENERGON_SAMPLE_TYPES the dataset's first sample is (None: none of ours)."""
    from janus_train.data.formats import IMAGE_PARTS

    try:
        raw = ShardReader().read(str(root / tars[0]), 0, 1)
        parts = raw[0].parts if raw and raw[0].error is None else None
    except Exception:  # noqa: BLE001 -- an empty or damaged first shard: no typed view
        return None
    if not parts:
        return None
    has_image = any(p in parts for p in IMAGE_PARTS)
    try:
        meta = json.loads(parts["json"]) if "json" in parts else {}
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    if has_image and "conversations" in meta:
        return "und"
    if "caption" in meta:
        return "gen" if has_image else "gen_caption"
    if not has_image and ("txt" in parts or "text" in meta or "conversations" in meta):
        return "text"
    return None


def _content_uuid(meta: Path) -> None:
    """Replace energon's random `index.uuid` with one derived from the index it names.

    energon writes a fresh uuid4 whenever it re-indexes, so two builds of the same data differed
    in that one file; a uuid from the index's own bytes (`index.sqlite` + `.info.json`, both
    deterministic) still changes whenever the index does, and lets a distributed build be
    compared byte for byte with a one-process one (data_pipelines/pretokenize.py)."""
    import hashlib
    import os
    import uuid

    target = meta / "index.uuid"
    if not target.is_file():
        return
    h = hashlib.sha256()
    for name in ("index.sqlite", ".info.json"):
        if (meta / name).is_file():
            h.update((meta / name).read_bytes())
    tmp = target.with_name(f"index.uuid.tmp.{os.getpid()}")
    tmp.write_text(str(uuid.UUID(bytes=h.digest()[:16], version=4)))
    os.replace(tmp, target)


def prepare_energon(root: str | Path, workers: int = 1, progress: bool = False) -> None:
    """Make `root` an energon dataset (what `energon prepare --split-ratio 1,0,0
    --non-interactive` does), programmatically: `.info.json`, `split.yaml`, the `.tar.idx`
    offsets, and a `dataset.yaml` that gives our samples as energon's standard sample types
    (VQASample / CaptioningSample / TextSample, through `sample_loader.py`) so that `energon
    info`, `energon lint` and `energon preview` work. `crude.yaml` is the same dataset as a
    CrudeWebdataset (raw parts, for a task encoder with cookers). A dataset whose first sample
    is none of ours gets the crude `dataset.yaml` only."""
    import yaml
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    root = Path(root)
    tars = sorted(str(p.relative_to(root)) for p in root.glob("**/*.tar"))
    if not tars:
        raise FileNotFoundError(f"{root}: no .tar shards to index")

    def progress_fn(items, total=None):
        if not progress:
            return items
        from tqdm import tqdm

        return iter(tqdm(items, total=total, desc="energon index", unit="shard"))

    WebdatasetPreparator.prepare_dataset(
        root,
        tars,
        split_parts_ratio=[("train", 1.0), ("val", 0.0), ("test", 0.0)],
        shuffle_seed=None,
        progress_fn=progress_fn,
        workers=max(1, workers),
    )
    meta = root / META_DIR
    _content_uuid(meta)
    crude = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}
    with open(meta / CRUDE_CONFIG, "w") as f:
        yaml.safe_dump(crude, f, sort_keys=False)
    kind = _energon_kind(root, tars)
    if kind is None:
        (meta / "sample_loader.py").unlink(missing_ok=True)
        with open(meta / "dataset.yaml", "w") as f:
            yaml.safe_dump(crude, f, sort_keys=False)
        return
    sample_type, fn = ENERGON_SAMPLE_TYPES[kind]
    (meta / "sample_loader.py").write_text(ENERGON_SAMPLE_LOADER)
    config = {
        "sample_type": {"__module__": "megatron.energon", "__class__": sample_type},
        "sample_loader": f"sample_loader.py:{fn}",
        "part_filter": "sample_loader.py:part_filter",
    }
    with open(meta / "dataset.yaml", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


def write_dataset(out: str | Path, task: str, samples: Iterable[dict[str, Any]], shard_size: int) -> Path:
    """Write webdataset samples ({"__key__": str, part: bytes}) as a dataset directory: shards of
    `shard_size` samples, energon's index and our metadata. For benches, tests and small tools;
    `data_pipelines.build_shards` is the resumable, validating builder for real data."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    w = None
    for i, sample in enumerate(samples):
        if i % shard_size == 0:
            if w is not None:
                w.close()
            w = wds.TarWriter(str(out / f"shard-{i // shard_size:06d}.tar"), mtime=0)
        w.write(sample)
    if w is not None:
        w.close()
    prepare_energon(out)
    write_janus_meta(out, {"task": task})
    return out


def sample_offsets(shard_path: str) -> np.ndarray:
    """uint64 [count+1]: byte offset of each sample start, then the end of the last sample."""
    return np.fromfile(shard_path + ".idx", dtype="<u8")


# ---- reading samples ----------------------------------------------------------------------


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if not field:
        return 0
    if field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
    return int(field, 8)


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def parse_sample(data: bytes, start: int = 0, end: int | None = None) -> tuple[str, dict[str, bytes]]:
    """Members of one sample, data[start:end] -> (key, {part: bytes}). Raises SampleError."""
    n = len(data) if end is None else min(end, len(data))
    pos = start
    key: str | None = None
    parts: dict[str, bytes] = {}
    long_name: str | None = None
    pax: dict[str, str] | None = None
    while pos + 512 <= n:
        if data[pos] == 0 and not data[pos : pos + 512].strip(b"\0"):
            break  # end-of-archive marker
        try:
            z = data.find(b"\0", pos, pos + 100)
            name = data[pos : z if z >= 0 else pos + 100].decode("utf-8")
            size = _octal(data[pos + 124 : pos + 136])
            if data[pos + 257 : pos + 262] == b"ustar" and data[pos + 345]:
                z = data.find(b"\0", pos + 345, pos + 500)
                name = data[pos + 345 : z if z >= 0 else pos + 500].decode("utf-8") + "/" + name
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleError("bad_tar", f"unreadable header at byte {pos}: {e}") from None
        typeflag = data[pos + 156]
        body = pos + 512
        stop = body + size
        if stop > n:
            raise SampleError("truncated_tar", f"member {name!r} needs {stop - n} more bytes")
        pos = body + ((size + 511) & ~511)
        if typeflag == 0x78:  # 'x': pax header for the next member
            pax = _pax_records(data[body:stop])
            continue
        if typeflag == 0x4C:  # 'L': GNU long name for the next member
            long_name = data[body:stop].split(b"\0", 1)[0].decode("utf-8")
            continue
        if typeflag not in (0x30, 0, 0x37):  # not a regular file ('0', NUL, '7')
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if pax:
            name = pax.get("path", name)
            if "size" in pax:
                raise SampleError("bad_tar", "pax size overrides are not supported")
            pax = None
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot < 0 or name.startswith("__", slash):
            continue  # no part name, or a webdataset/energon meta file
        if key is None:
            key = name[:dot]
        parts[name[dot + 1 :]] = data[body:stop]
    if key is None:
        if start < pos < n or (pos + 512 > n and pos < n):
            raise SampleError("truncated_tar", "sample ends inside a header")
        raise SampleError("bad_tar", "no members in sample")
    return key, parts


@dataclass
class RawSample:
    index: int  # sample index in the shard
    key: str
    parts: dict[str, bytes] | None
    error: SampleError | None = None


class ShardReader:
    """Reads samples of one dataset's shards by index; keeps offsets and files cached."""

    def __init__(self) -> None:
        self._offsets: dict[str, np.ndarray] = {}

    def offsets(self, shard_path: str) -> np.ndarray:
        off = self._offsets.get(shard_path)
        if off is None:
            off = sample_offsets(shard_path)
            if len(self._offsets) > 4096:
                self._offsets.clear()
            self._offsets[shard_path] = off
        return off

    def read(self, shard_path: str, start: int, stop: int, wanted: Callable[[int], bool] | None = None) -> list[RawSample]:
        """Samples start..stop-1 of a shard; damaged ones carry `error` instead of parts."""
        try:
            off = self.offsets(shard_path)
            with open(shard_path, "rb") as f:
                f.seek(int(off[start]))
                data = f.read(int(off[stop]) - int(off[start]))
        except FileNotFoundError as e:
            err = SampleError("missing_shard", str(e))
            return [RawSample(i, f"{Path(shard_path).name}#{i}", None, err) for i in range(start, stop)]
        bounds = (off[start : stop + 1] - off[start]).tolist()
        n = len(data)
        out: list[RawSample] = []
        for i in range(start, stop):
            if wanted is not None and not wanted(i):
                continue
            a, b = bounds[i - start], bounds[i - start + 1]
            try:
                if a >= n:
                    raise SampleError("truncated_tar", f"shard ends {b - n} bytes early, before the sample")
                key, parts = parse_sample(data, a, b)
                if b > n:
                    raise SampleError("truncated_tar", f"shard ends {b - n} bytes early, inside the sample")
                out.append(RawSample(i, key, parts))
            except SampleError as e:
                out.append(RawSample(i, f"{Path(shard_path).name}#{i}", None, e))
        return out
