"""Encode the images of a gen dataset to VQ codes with the checkpoint's frozen VQ model.

    python -m data_pipelines.pretokenize_vq --ckpt DIR --in DIR --out DIR
        [--batch-size B] [--device cpu|cuda] [--keep-image]

For every sample of every input shard: the paper's gen preprocessing (short side to the
model's gen image size, centre crop, [-1, 1]), `model.vq.encode_codes`, and the sample is
written to the same-named output shard as `json` (caption, source, prompt_tokenizer),
`codes.npy` (uint16, or int32 for codebooks over 65536) and `prompt_ids.npy` (int32 ids of
`gen_prompt(caption)`, so the loader need not tokenise; it checks the tokenizer fingerprint
and re-tokenises if it differs). The image is dropped unless --keep-image.

Resumable: an output shard is done once its report `OUT/.build/<shard>.json` exists. Samples
that fail (damaged image, empty caption, bad json) are skipped and counted in
`OUT/build_report.json`. The output directory is an energon dataset like the input.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from janus_train.contracts import conversation as conv
from janus_train.data import formats as fmt
from janus_train.contracts.preprocess import gen_pixels, open_rgb
from janus_train.data.shards import ShardReader, dataset_shards, prepare_energon, read_janus_meta, write_janus_meta
from janus_train.contracts.tokens import TokenizerInfo

MAX_EXAMPLES = 200


def _encode_batch(model: Any, pixels: list[torch.Tensor], device: str) -> np.ndarray:
    with torch.no_grad():
        x = torch.stack(pixels).to(device)
        return model.vq.encode_codes(x).cpu().numpy()


def pretokenize_shard(
    model: Any,
    tok: TokenizerInfo,
    shard_path: str,
    count: int,
    out_path: Path,
    gen_size: int,
    codebook_size: int,
    batch_size: int,
    device: str,
    keep_image: bool,
    bar: tqdm,
) -> dict[str, Any]:
    import webdataset as wds

    report: dict[str, Any] = {"shard": out_path.name, "rows": 0, "written": 0, "skipped": {}, "examples": []}
    code_dtype = np.uint16 if codebook_size <= 65536 else np.int32
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
            codes = _encode_batch(model, [p[3] for p in pending], device)
            for (key, meta, parts, _), c in zip(pending, codes):
                prompt = np.asarray(tok.encode(conv.gen_prompt(meta["caption"])), dtype=np.int32)
                sample = {
                    "__key__": key,
                    "json": json.dumps(meta).encode(),
                    fmt.CODES_PART: fmt.npy_bytes(c.astype(code_dtype)),
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
                        pix = gen_pixels(open_rgb(img_bytes), gen_size)
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


def pretokenize(
    ckpt: str | Path,
    in_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 64,
    device: str = "cpu",
    keep_image: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    from janus_train.checkpoint.io import load_pretrained

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if in_dir.resolve() == out_dir.resolve():
        raise ValueError(f"--out must differ from --in ({in_dir})")
    shards = dataset_shards(in_dir)
    (out_dir / ".build").mkdir(parents=True, exist_ok=True)
    model = load_pretrained(str(ckpt)).to(device).eval()
    cfg = model.config
    tok = TokenizerInfo.from_hf(str(ckpt))
    gen_size, codebook = int(cfg.gen_image_size), int(cfg.vq.codebook_size)
    reports: list[dict[str, Any]] = []
    todo = []
    for sh in shards:
        rep = out_dir / ".build" / (Path(sh.name).name + ".json")
        if rep.is_file():
            reports.append(json.loads(rep.read_text()))
        else:
            todo.append(sh)
    bar = tqdm(total=sum(s.count for s in shards), desc="vq encode", unit="img", disable=not progress)
    bar.update(sum(r["rows"] for r in reports))
    for sh in todo:
        out_path = out_dir / Path(sh.name).name
        r = pretokenize_shard(model, tok, sh.path, sh.count, out_path, gen_size, codebook, batch_size, device, keep_image, bar)
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
        "num_gen_tokens": int(cfg.gen_grid) ** 2,
        "codebook_size": codebook,
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
            "builder": "pretokenize_vq",
            "num_gen_tokens": summary["num_gen_tokens"],
            "prompt_tokenizer": tok.fingerprint,
        },
    )
    (out_dir / "build_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (its VQ model and tokenizer are used)")
    p.add_argument("--in", dest="in_dir", required=True, help="gen dataset with images (from build_shards)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep-image", action="store_true", help="also keep the image in the output samples")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    s = pretokenize(args.ckpt, args.in_dir, args.out, args.batch_size, args.device, args.keep_image)
    print(f"encoded {s['written']} of {s['rows']} samples to {args.out}; skipped {s['skipped'] or 0}")


if __name__ == "__main__":
    main()
