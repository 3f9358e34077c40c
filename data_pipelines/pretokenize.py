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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from janus_train.contracts import conversation as conv
from janus_train.data import formats as fmt
from janus_train.contracts.preprocess import gen_pixels, open_rgb
from janus_train.data.shards import ShardReader, dataset_shards, prepare_energon, read_janus_meta, write_janus_meta
from janus_train.contracts.tokens import TokenizerInfo

MAX_EXAMPLES = 200


@dataclass
class ImageEncoder:
    """What a family stores for a gen image: `encode(pixels [B, 3, S, S] in [-1, 1]) -> one dict
    of {part name: bytes} per image`, at `image_size`; `meta` goes into the dataset's janus meta
    and the build report; `name` labels the progress bar and the builder."""

    name: str
    image_size: int
    encode: Callable[[torch.Tensor], list[dict[str, bytes]]]
    meta: dict[str, Any]


def vq_encoder(model: Any, device: str) -> ImageEncoder:
    """Janus-Pro: `codes.npy`, uint16 (int32 for codebooks over 65536)."""
    codebook = int(model.config.vq.codebook_size)
    dtype = np.uint16 if codebook <= 65536 else np.int32

    def encode(x: torch.Tensor) -> list[dict[str, bytes]]:
        with torch.no_grad():
            codes = model.vq.encode_codes(x.to(device)).cpu().numpy()
        return [{fmt.CODES_PART: fmt.npy_bytes(c.astype(dtype))} for c in codes]

    meta = {"num_gen_tokens": int(model.config.gen_grid) ** 2, "codebook_size": codebook}
    return ImageEncoder("vq", int(model.config.gen_image_size), encode, meta)


def pretokenize_shard(
    encoder: ImageEncoder,
    tok: TokenizerInfo,
    shard_path: str,
    count: int,
    out_path: Path,
    batch_size: int,
    keep_image: bool,
    bar: tqdm,
) -> dict[str, Any]:
    import webdataset as wds

    report: dict[str, Any] = {"shard": out_path.name, "rows": 0, "written": 0, "skipped": {}, "examples": []}
    reader = ShardReader()

    def skip(key: str, e: fmt.SampleError) -> None:
        report["skipped"][e.reason] = report["skipped"].get(e.reason, 0) + 1
        if len(report["examples"]) < MAX_EXAMPLES:
            report["examples"].append({"key": key, "reason": e.reason, "detail": e.detail})

    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as w:
        pending: list[tuple[str, dict[str, Any], dict[str, bytes], torch.Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            encoded = encoder.encode(torch.stack([p[3] for p in pending]))
            for (key, meta, parts, _), enc in zip(pending, encoded):
                prompt = np.asarray(tok.encode(conv.gen_prompt(meta["caption"])), dtype=np.int32)
                sample = {
                    "__key__": key,
                    "json": json.dumps(meta).encode(),
                    **enc,
                    fmt.PROMPT_IDS_PART: fmt.npy_bytes(prompt),
                }
                if keep_image:
                    for ext in fmt.IMAGE_PARTS:
                        if ext in parts:
                            sample[ext] = parts[ext]
                w.write(sample)
                report["written"] += 1
            pending.clear()

        for start in range(0, count, 256):
            for raw in reader.read(shard_path, start, min(count, start + 256)):
                report["rows"] += 1
                bar.update(1)
                if raw.error is not None:
                    skip(raw.key, raw.error)
                    continue
                try:
                    obj = fmt.parse_json(raw.parts.get("json"))
                    meta = dict(obj)
                    meta["caption"] = fmt.get_caption(obj)
                    meta["prompt_tokenizer"] = tok.fingerprint
                    img_bytes = fmt.image_part(raw.parts)
                    if img_bytes is None:
                        raise fmt.SampleError("missing_key", "gen sample has no image to encode")
                    try:
                        pix = gen_pixels(open_rgb(img_bytes), encoder.image_size)
                    except Exception as e:
                        raise fmt.SampleError("bad_image", f"{type(e).__name__}: {e}"[:200]) from None
                except fmt.SampleError as e:
                    skip(raw.key, e)
                    continue
                pending.append((raw.key, meta, raw.parts, pix))
                if len(pending) >= batch_size:
                    flush()
        flush()
    if report["written"]:
        os.replace(tmp, out_path)
    else:
        tmp.unlink()
    return report


def run(
    encoder: ImageEncoder,
    ckpt: str | Path,
    in_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 64,
    keep_image: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every shard of `in_dir` into `out_dir` (resumable); prompts with `ckpt`'s tokenizer."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if in_dir.resolve() == out_dir.resolve():
        raise ValueError(f"--out must differ from --in ({in_dir})")
    shards = dataset_shards(in_dir)
    (out_dir / ".build").mkdir(parents=True, exist_ok=True)
    tok = TokenizerInfo.from_hf(str(ckpt))
    reports: list[dict[str, Any]] = []
    todo = []
    for sh in shards:
        rep = out_dir / ".build" / (Path(sh.name).name + ".json")
        if rep.is_file():
            reports.append(json.loads(rep.read_text()))
        else:
            todo.append(sh)
    bar = tqdm(total=sum(s.count for s in shards), desc=f"{encoder.name} encode", unit="img", disable=not progress)
    bar.update(sum(r["rows"] for r in reports))
    for sh in todo:
        out_path = out_dir / Path(sh.name).name
        r = pretokenize_shard(encoder, tok, sh.path, sh.count, out_path, batch_size, keep_image, bar)
        rep = out_dir / ".build" / (out_path.name + ".json")
        rep.with_suffix(".tmp").write_text(json.dumps(r) + "\n")
        os.replace(rep.with_suffix(".tmp"), rep)
        reports.append(r)
    bar.close()
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
        "prompt_tokenizer": tok.fingerprint,
    }
    if summary["written"] == 0:
        raise RuntimeError(f"no sample of {in_dir} could be encoded (skipped: {skipped})")
    if todo or not (out_dir / ".nv-meta" / ".info.json").is_file():
        prepare_energon(out_dir, progress=progress)
    src = read_janus_meta(in_dir)
    write_janus_meta(
        out_dir,
        {
            "task": "gen",
            "source": src.get("source"),
            "samples": summary["written"],
            "builder": f"pretokenize_{encoder.name}",
            **encoder.meta,
            "prompt_tokenizer": tok.fingerprint,
        },
    )
    (out_dir / "build_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
