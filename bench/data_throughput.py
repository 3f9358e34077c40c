"""Data loader throughput, end to end (read + decode + preprocess + tokenise + pack + collate).

    python bench/data_throughput.py [--work DIR] [--und-samples N] [--gen-samples N] [--steps N]

Builds (once, cached in --work) Janus-Pro-sized datasets: und samples with ~640x480 JPEG
photo-like images (coloured shapes with sensor noise) and 1-3 turn QA, half of them with a
detailed answer of 10 to ~1500 tokens (with the default system prompt, as training uses),
gen samples
pre-tokenised to 576 VQ codes plus stored prompt ids (captions of ~10-150 tokens), and text
of 10-1500 tokens; the model geometry is Janus-Pro's (384 px, 576 image tokens, codebook
16384), the tokenizer the tiny test one. It then measures:

  und / gen samples per second per CPU core = samples / CPU-seconds spent by the training
      process and its decode workers (start-up included; torch limited to one thread; each
      run in a fresh forked process), with
      num_workers=0 (everything in one process) and with --workers decode processes. CPU time
      rather than wall time, because a shared machine's other jobs would otherwise count;
      wall-clock samples/s is printed too;
  pad fraction at seq_len 4096 for each task and overall, in a 2:3:5 stage-2 mix;
  the best-of-30 time of PIL's JPEG decode and bicubic resize of one image, the floor of the
      exact und path (transformers' processor makes the same two calls).

Prints one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines import synthetic_shapes as shapes  # noqa: E402
from janus_train.contracts import conversation as conv  # noqa: E402
from janus_train.data import formats as fmt  # noqa: E402
from janus_train.data.config import DataConfig, ImageConfig  # noqa: E402
from janus_train.data.loader import build_train_loader  # noqa: E402
from janus_train.data.shards import write_dataset  # noqa: E402
from janus_train.contracts.tokens import TokenizerInfo  # noqa: E402

JANUS_PRO = ImageConfig(image_size=384, num_image_tokens=576, gen_image_size=384, num_gen_tokens=576, codebook_size=16384)
SHARD = 500


def _tokenizer():
    from janus_train.tools.tiny_tokenizer import build_tokenizer

    return build_tokenizer()


def _write(out: Path, task: str, samples) -> None:
    write_dataset(out, task, samples, SHARD)


def build_und(out: Path, n: int, resize: int | None = None) -> None:
    """`resize`: store the images as build_shards --und-resize does (pre-resized PNG)."""
    from janus_train.contracts.preprocess import und_resize

    def gen():
        for i in range(n):
            rng = np.random.default_rng([7, i])
            scene = shapes.make_scene(rng)
            scene["aspect"] = 4 / 3
            img = shapes.render(scene, 640, rng)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            turns = shapes.conversation(scene, rng)
            if rng.random() < 0.5:  # dense descriptions / document-style answers: 10..~1500 tokens
                turns += [{"role": "user", "content": "Describe the image in detail."}, {"role": "assistant", "content": shapes.text_sample(rng)}]
            if resize:
                arr = und_resize(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), resize)
                png = io.BytesIO()
                Image.fromarray(arr).save(png, "PNG", compress_level=6)
                part = {"png": png.getvalue()}
            else:
                part = {"jpg": buf.getvalue()}
            yield {"__key__": f"und-{i:08d}", **part, "json": json.dumps({"conversations": turns}).encode()}

    _write(out, "und", gen())


def build_gen(out: Path, n: int, tok: TokenizerInfo, source: str, salt: int) -> None:
    def gen():
        for i in range(n):
            rng = np.random.default_rng([11, salt, i])
            words = [shapes.aesthetic_prompt(shapes.make_scene(rng), rng) for _ in range(int(rng.integers(1, 8)))]
            cap = " ".join(words)
            prompt = np.asarray(tok.encode(conv.gen_prompt(cap)), dtype=np.int32)
            codes = rng.integers(0, JANUS_PRO.codebook_size, JANUS_PRO.num_gen_tokens).astype(np.uint16)
            meta = {"caption": cap, "source": source, "prompt_tokenizer": tok.fingerprint}
            yield {
                "__key__": f"{source}-{i:08d}",
                "json": json.dumps(meta).encode(),
                fmt.CODES_PART: fmt.npy_bytes(codes),
                fmt.PROMPT_IDS_PART: fmt.npy_bytes(prompt),
            }

    _write(out, "gen", gen())


def build_text(out: Path, n: int) -> None:
    def gen():
        for i in range(n):
            rng = np.random.default_rng([13, i])
            yield {"__key__": f"text-{i:08d}", "txt": shapes.text_sample(rng).encode()}

    _write(out, "text", gen())


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(cfg: DataConfig, tok: TokenizerInfo, steps: int, task: str) -> dict:
    """Samples per CPU-second over the loader's whole life (start-up included), counting the
    training process and its decode workers; and samples per wall second."""
    child0, cpu0, t0 = _children_cpu(), time.process_time(), time.perf_counter()
    loader = build_train_loader(cfg, tok, JANUS_PRO, 0, 1)
    docs = rows = pad = 0
    try:
        for _ in range(steps):
            for mb in next(loader):
                docs += mb.meta["num_docs"]
                rows += mb.num_rows
                pad += mb.meta["pad_tokens"]
    finally:
        loader.close()  # waits for the workers, so their CPU time is in RUSAGE_CHILDREN
    wall = time.perf_counter() - t0
    main_cpu, worker_cpu = time.process_time() - cpu0, _children_cpu() - child0
    return {
        "task": task,
        "num_workers": cfg.num_workers,
        "samples": docs,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(main_cpu + worker_cpu, 3),
        "samples_per_cpu_second": round(docs / (main_cpu + worker_cpu), 1),
        "samples_per_wall_second": round(docs / wall, 1),
        "pad_fraction": round(pad / (rows * cfg.seq_len), 4),
    }


def measure_isolated(cfg: DataConfig, tok: TokenizerInfo, steps: int, task: str) -> dict:
    """`measure` in a forked child, so that no run inherits the heap and caches an earlier run
    left behind (a gen run right after the und runs measured 10-15% slower in-process)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send(measure(cfg, tok, steps, task))
        except BaseException as e:  # report, don't hang the parent
            send.send({"error": repr(e)})

    proc = ctx.Process(target=child)
    proc.start()
    result = recv.recv()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{task} measurement failed: {result['error']}")
    return result


def pil_floor_ms(und_dir: Path, size: int = 384, repeats: int = 30) -> dict:
    """Best-of-N milliseconds of the two PIL calls the exact und path cannot avoid (JPEG
    decode and the bicubic resize), on the first few bench images: the per-core ceiling."""
    from janus_train.contracts.preprocess import open_rgb
    from janus_train.data.shards import ShardReader, dataset_shards

    sh = dataset_shards(und_dir)[0]
    raws = [r.parts["jpg"] for r in ShardReader().read(sh.path, 0, 8)]
    best = {"decode": float("inf"), "resize": float("inf")}
    for _ in range(repeats):
        for raw in raws:
            t = time.perf_counter()
            img = open_rgb(raw)
            t1 = time.perf_counter()
            w, h = img.size
            img.resize((size, round(h * size / w)), 3)  # PIL.Image.BICUBIC
            t2 = time.perf_counter()
            best["decode"] = min(best["decode"], t1 - t)
            best["resize"] = min(best["resize"], t2 - t1)
    out = {k: round(v * 1e3, 3) for k, v in best.items()}
    out["max_und_samples_per_s_per_core"] = round(1e3 / (out["decode"] + out["resize"]), 1)
    return out


def draft_ms(repeats: int = 30) -> dict:
    """Best-of-N ms to decode + resize a 1280x960 JPEG to 384 px, with and without
    `jpeg_draft` (reduced-DCT decoding; fast but not pixel-exact)."""
    from janus_train.contracts.preprocess import open_rgb, und_resize

    rng = np.random.default_rng(0)
    scene = shapes.make_scene(rng)
    scene["aspect"] = 4 / 3
    buf = io.BytesIO()
    shapes.render(scene, 1280, rng).save(buf, "JPEG", quality=90)
    raw = buf.getvalue()
    out = {}
    for name, draft in (("full", None), ("draft", 384)):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            und_resize(open_rgb(raw, draft), 384)
            best = min(best, time.perf_counter() - t)
        out[name] = round(best * 1e3, 3)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/janus_data_bench", help="where the bench datasets are cached")
    p.add_argument("--und-samples", type=int, default=3000)
    p.add_argument("--gen-samples", type=int, default=60000, help="per gen source (real, synthetic)")
    p.add_argument("--text-samples", type=int, default=5000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    tok = TokenizerInfo.from_hf(_tokenizer())
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # energon's indexer prints progress
        if not (work / "und" / ".nv-meta").is_dir():
            build_und(work / "und", args.und_samples)
        if not (work / "und_resized" / ".nv-meta").is_dir():
            build_und(work / "und_resized", args.und_samples, resize=384)
        for salt, src in enumerate(("real", "synthetic")):
            if not (work / src / ".nv-meta").is_dir():
                build_gen(work / src, args.gen_samples, tok, src, salt)
        if not (work / "text" / ".nv-meta").is_dir():
            build_text(work / "text", args.text_samples)
    build_s = time.perf_counter() - t

    base = {
        "und": [{"path": str(work / "und"), "name": "und"}],
        "text": [{"path": str(work / "text"), "name": "text"}],
        "gen": [{"path": str(work / "real"), "name": "real"}, {"path": str(work / "synthetic"), "name": "synthetic"}],
        "seq_len": 4096,
        "micro_batch_rows": 4,
        "chunk_size": 64,
        "und_system_prompt": "default",  # what training uses by default (~45 tokens)
    }
    cores = os.cpu_count() or 1
    results = []
    for workers in (0, args.workers):
        # und rows hold ~5 documents, gen rows ~6: size the steps so each run sees thousands.
        und = DataConfig.from_dict({**base, "ratio": [1, 0, 0], "global_batch": 16, "num_workers": workers})
        results.append({**measure_isolated(und, tok, args.steps, "und"), "shards": "JPEG as given"})
        pre = DataConfig.from_dict({**base, "und": [{"path": str(work / "und_resized"), "name": "und"}], "ratio": [1, 0, 0], "global_batch": 16, "num_workers": workers})
        results.append({**measure_isolated(pre, tok, args.steps, "und"), "shards": "pre-resized PNG (build_shards --und-resize 384)"})
        gen = DataConfig.from_dict({**base, "ratio": [0, 0, 1], "global_batch": 256, "num_workers": workers})
        results.append(measure_isolated(gen, tok, args.steps, "gen"))

    mix = DataConfig.from_dict({**base, "ratio": [2, 3, 5], "global_batch": 40, "num_workers": args.workers})
    loader = build_train_loader(mix, tok, JANUS_PRO, 0, 1)
    per_task = {t: [0, 0] for t in ("und", "text", "gen")}
    try:
        next(loader)
        for _ in range(args.steps):
            for mb in next(loader):
                task = mb.meta["task"]
                per_task[task][0] += mb.meta["pad_tokens"]
                per_task[task][1] += mb.num_rows * mb.seq_len
    finally:
        loader.close()
    pad = {t: round(a / b, 4) for t, (a, b) in per_task.items() if b}
    pad["overall"] = round(sum(a for a, _ in per_task.values()) / sum(b for _, b in per_task.values()), 4)
    print(
        json.dumps(
            {
                "machine": f"{cores}-core CPU",
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                "torch_threads": torch.get_num_threads(),
                "dataset_build_seconds": round(build_s, 1),
                "throughput": results,
                "und_pil_floor_ms_640x480_to_384": pil_floor_ms(work / "und"),
                "jpeg_draft_ms_1280x960_to_384": draft_ms(),
                "pad_fraction_seq4096_mix_2_3_5": pad,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
