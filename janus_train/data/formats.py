"""The on-disk sample schema of the three task streams, and the reasons a sample is skipped.

Every dataset is a directory of WebDataset tar shards (plus energon's `.nv-meta/` index). A
sample is the group of tar members sharing a key (`<key>.<part>`); keys contain no dots.

  und   `<key>.jpg|jpeg|png|webp` one image, and `<key>.json`:
        {"conversations": [{"role": "user", "content": "<image>\\nWhat is this?"},
                           {"role": "assistant", "content": "A red circle."}, ...],
         "system": optional str, "source": optional str}
        The "<image>" marker says where the image goes; without one, the image is put before
        the first user turn's text (the LLaVA convention). Multi-turn is allowed.
  text  `<key>.txt` plain UTF-8 text, or `<key>.json` with {"text": str} or
        {"conversations": [...]} (a chat without images).
  gen   `<key>.json` {"caption": str, "source": optional str ("real", "synthetic", ...)} and
        either the image (`<key>.jpg|...`) or its VQ codes `<key>.codes.npy` (integer [N]).
        `pretokenize_vq` also writes `<key>.prompt_ids.npy` (int32 ids of the whole gen prompt,
        without BOS) with "prompt_tokenizer" in the json, so the loader need not tokenise.
        JanusFlow: instead of codes, `<key>.latent_mean.npy` and `<key>.latent_std.npy` (fp16
        [C, h, w], the VAE posterior, `pretokenize_vae`); the image stays for REPA.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import orjson

IMAGE_PARTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CODES_PART = "codes.npy"
# JanusFlow gen samples: the VAE posterior of the image (data_pipelines.pretokenize_vae).
LATENT_MEAN_PART = "latent_mean.npy"
LATENT_STD_PART = "latent_std.npy"
PROMPT_IDS_PART = "prompt_ids.npy"

# Why a sample was skipped. Counted per source in loader.stats() and in build reports.
SKIP_REASONS: tuple[str, ...] = (
    "truncated_tar",  # the shard ends before the sample does
    "bad_tar",  # a tar header that cannot be parsed
    "missing_shard",  # a shard listed in the index is not on disk
    "missing_file",  # a manifest row names a file that does not exist (build time)
    "bad_image",  # undecodable image bytes
    "bad_json",  # json that does not parse, or is not an object
    "missing_key",  # a required part or json field is absent
    "empty_caption",
    "empty_text",
    "bad_text",  # text that is not UTF-8
    "bad_conversation",  # wrong roles, no assistant turn, image slots != images
    "bad_codes",  # codes of the wrong count or out of the codebook
    "bad_latent",  # a stored VAE latent of the wrong shape or not finite (JanusFlow)
    "too_long",  # longer than seq_len and not truncatable (see packing rules)
)


class SampleError(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_json(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise SampleError("missing_key", "no .json part")
    try:
        # orjson is ~3x faster on the small per-sample objects (a third of a gen sample's decode
        # time with the standard module). It refuses NaN/Infinity, so anything it refuses gets
        # the standard parser's verdict and both accept the same samples. (It reads integers
        # beyond 64 bits as floats; no field the loader reads is a number.)
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleError("bad_json", str(e)[:200]) from None
    if not isinstance(obj, dict):
        raise SampleError("bad_json", f"expected a json object, got {type(obj).__name__}")
    return obj


def image_part(parts: dict[str, bytes]) -> bytes | None:
    for name in IMAGE_PARTS:
        if name in parts:
            return parts[name]
    return None


def get_conversation(obj: dict[str, Any]) -> list[dict[str, str]]:
    turns = obj.get("conversations", obj.get("messages"))
    if turns is None:
        raise SampleError("missing_key", "json has no 'conversations'")
    if not isinstance(turns, list) or not turns:
        raise SampleError("bad_conversation", "'conversations' must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("role") not in ("user", "assistant") or not isinstance(t.get("content"), str):
            raise SampleError("bad_conversation", f"turn {i} must be {{'role': 'user'|'assistant', 'content': str}}")
        out.append({"role": t["role"], "content": t["content"]})
    if not any(t["role"] == "assistant" for t in out):
        raise SampleError("bad_conversation", "no assistant turn (nothing to learn)")
    return out


def get_caption(obj: dict[str, Any]) -> str:
    cap = obj.get("caption")
    if cap is None:
        raise SampleError("missing_key", "json has no 'caption'")
    if not isinstance(cap, str) or not cap.strip():
        raise SampleError("empty_caption", "caption is empty")
    return cap.strip()


# np.load parses the npy header with ast.literal_eval (~10 us a call). Headers written by
# numpy have one fixed layout, so read descr and shape with a regex and fall back to
# literal_eval for anything else.
_NPY_HEADER = re.compile(rb"\{'descr': '([^']+)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}")
_DTYPES: dict[bytes, np.dtype] = {}


def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    m = _NPY_HEADER.match(header)
    if m is not None:
        dt = _DTYPES.get(m.group(1))
        if dt is None:
            dt = _DTYPES.setdefault(m.group(1), np.dtype(m.group(1).decode()))
        shape = tuple(int(x) for x in m.group(2).split(b",") if x.strip())
        return dt, shape
    import ast

    d = ast.literal_eval(header.decode("latin1"))
    if d.get("fortran_order"):
        raise ValueError("fortran order npy is not supported")
    return np.dtype(d["descr"]), tuple(d["shape"])


_PARSED: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int]] = {}


def load_npy(raw: bytes) -> np.ndarray:
    """Decode .npy bytes (read-only array, no copy)."""
    try:
        hlen = raw[8] | (raw[9] << 8) if raw[6] == 1 else int.from_bytes(raw[8:12], "little")
        start = (10 if raw[6] == 1 else 12) + hlen
        header = raw[:start]
        parsed = _PARSED.get(header)  # shards repeat a few hundred distinct headers at most
        if parsed is None:
            if raw[:6] != b"\x93NUMPY":
                raise ValueError("not an npy file")
            dtype, shape = _npy_header(raw[start - hlen : start])
            count = 1
            for n in shape:
                count *= n
            if len(_PARSED) >= 4096:
                _PARSED.clear()
            parsed = _PARSED[header] = (dtype, shape, count, start)
        dtype, shape, count, start = parsed
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=start)
        return arr if len(shape) == 1 else arr.reshape(shape)
    except (ValueError, SyntaxError, KeyError, TypeError, IndexError) as e:
        raise SampleError("bad_codes", f"cannot decode npy: {e}") from None


def npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()
