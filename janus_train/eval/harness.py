"""What a model can do, measured on held-out data: the evaluation harness.

    report = Evaluator(model, tokenizer, data, settings, ctx).run(out_dir)

Tasks (each optional):
  loss   per-task validation loss on held-out shards: the token-mean CE of the training
         normalisation, over the first `num` documents of each task's sets, packed into rows
         of `data.seq_len` (one row per forward, so a row's result never depends on the others).
         JanusFlow's gen documents give the flow loss (squared error per latent element) and
         REPA (1 - cos per latent token) instead of a CE, on one fixed draw of (x1, z0, t)
         per document: `flow_draw` of (eval seed, document key), scaled by the gen data's
         VAE scaling factor, so every evaluation of every checkpoint sees the same draws.
  und    answers generated greedily for the held-out und conversations (every assistant turn,
         with the earlier turns as context) compared with the references by normalised exact
         match, overall and per question `type` where the data tags one; and, with an MMBench
         TSV, multiple choice by likelihood (the option letter the model finds most likely).
  gen    CFG samples for the held-out gen captions (prompt i drawn with seed + i), a PNG grid
         with each prompt under its image, scored by a pluggable scorer (eval/scorers.py); and,
         with GenEval prompts, GenEval's folder layout for GenEval's own scorer. Janus-Pro
         samples VQ codes (temperature) and decodes them with its VQ; JanusFlow runs its Euler
         ODE (`flow_steps` steps) and decodes the latents with the VAE it was trained with.

Distributed (`EvalContext`): with whole weights on every rank the items are split over the
ranks and the results gathered by item index, so N ranks report exactly what one does. Under
ZeRO-3 or tensor parallelism every rank evaluates every item (their forwards must stay in step:
gathers and TP collectives are per module call).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import math
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from janus_train.contracts import conversation as conv
from janus_train.contracts.batch import TASK_ID, TASKS, Doc, Row, collate
from janus_train.contracts.errors import ConfigError
from janus_train.contracts.tokens import TokenizerInfo, conversation_ids
from janus_train.data import formats as fmt
from janus_train.data.config import ImageConfig
from janus_train.data.shards import ShardReader, dataset_shards, read_janus_meta
from janus_train.data.tokenize import DocBuilder, flow_draw
from janus_train.eval.config import EvalData, EvalSettings
from janus_train.inference.flow import FlowSampleConfig, check_vae, generate_latents, latents_to_images, load_vae
from janus_train.inference.t2i import SampleConfig, codes_to_images, generate_codes, prompt_grid
from janus_train.inference.understand import answer
from janus_train.models.janusflow.config import JanusFlowConfig


@dataclass
class EvalContext:
    """Where the evaluation runs: this rank, the ranks that share the work, the device."""

    rank: int = 0
    world: int = 1
    shard: bool = True  # split items over the ranks (every rank holds whole weights)
    group: Any = None  # the process group of those ranks (None: the default group)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    zero3: bool = False  # parameters are ZeRO-3 partitioned (gather the VQ to decode)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> range:
        return range(self.rank, n, self.world) if self.shard and self.world > 1 else range(n)

    def gather(self, local: dict[int, Any]) -> dict[int, Any]:
        """Every rank's {item index: result}, merged (the same on every rank)."""
        if not (self.shard and self.world > 1 and dist.is_initialized()):
            return local
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, local, group=self.group)
        merged: dict[int, Any] = {}
        for part in parts:
            merged.update(part)
        return merged


# ---- reading held-out sets -----------------------------------------------------------------------


def iter_samples(paths: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, parts) of every readable sample of the shard directories, in order."""
    reader = ShardReader()
    for path in paths:
        for shard in dataset_shards(path):
            for raw in reader.read(shard.path, 0, shard.count):
                if raw.parts is not None:
                    yield raw.key, raw.parts


def normalise_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: 'The circle is red.' ~ 'the circle is red'."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


@dataclass
class Question:
    key: str
    image: bytes
    turns: list[dict[str, str]]  # the conversation up to and including the question
    reference: str
    kind: str | None


def und_questions(paths: list[str], limit: int) -> list[Question]:
    """Every assistant turn of the held-out und conversations, in order, up to `limit`."""
    out: list[Question] = []
    for key, parts in iter_samples(paths):
        image = fmt.image_part(parts)
        try:
            obj = fmt.parse_json(parts.get("json"))
            raw_turns = obj.get("conversations", obj.get("messages"))
            turns = fmt.get_conversation(obj)
        except fmt.SampleError:
            continue
        if image is None:
            continue
        for j, turn in enumerate(turns):
            if turn["role"] != "assistant" or j == 0:
                continue
            user = raw_turns[j - 1] if isinstance(raw_turns[j - 1], dict) else {}
            kind = user.get("type") or obj.get("question_type")
            out.append(Question(f"{key}#{j}", image, turns[:j], turn["content"], kind))
            if len(out) >= limit:
                return out
    return out


def gen_prompts(paths: list[str], limit: int) -> list[tuple[str, str]]:
    """(key, caption) of the held-out gen samples, in order, up to `limit`."""
    out = []
    for key, parts in iter_samples(paths):
        try:
            out.append((key, fmt.get_caption(fmt.parse_json(parts.get("json")))))
        except fmt.SampleError:
            continue
        if len(out) >= limit:
            break
    return out


MMBENCH_REQUIRED = ("index", "question", "A", "B", "answer", "image")
MMBENCH_OPTIONS = ("A", "B", "C", "D", "E")


def read_mmbench(path: str) -> list[dict[str, str]]:
    """Rows of a TSV in VLMEvalKit's MMBench layout (index, question, hint, A..D, answer,
    image as base64; an image may also be the index of the row holding it)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in MMBENCH_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError("mmbench", f"{path} lacks column(s) {missing} (MMBench TSV: index, question, hint, A..D, answer, image)")
        rows = list(reader)
    by_index = {r["index"]: r["image"] for r in rows}
    for r in rows:
        img = r["image"]
        if len(img) < 16 and img in by_index:  # a reference to another row's image
            r["image"] = by_index[img]
    return rows


def mmbench_prompt(row: dict[str, str]) -> tuple[str, list[str]]:
    letters = [c for c in MMBENCH_OPTIONS if (row.get(c) or "").strip() and row.get(c, "").strip().lower() != "nan"]
    hint = (row.get("hint") or "").strip()
    lines = ([hint] if hint and hint.lower() != "nan" else []) + [row["question"].strip()]
    lines += [f"{c}. {row[c].strip()}" for c in letters]
    lines.append("Answer with the option's letter from the given choices directly.")
    return "\n".join(lines), letters


# ---- the evaluator ------------------------------------------------------------------------------


class Evaluator:
    """`vae` (JanusFlow only): the diffusers AutoencoderKL that decodes the gen samples, loaded or
    as a directory (loaded on first use, on the context's device); the gen task needs it."""

    def __init__(self, model, tokenizer, data: EvalData, settings: EvalSettings, ctx: EvalContext | None = None, vae: Any = None):
        self.model = model
        self.tok = TokenizerInfo.of(tokenizer)
        self.data = data
        self.s = settings
        self.ctx = ctx or EvalContext()
        self.grid: Image.Image | None = None  # the last gen grid (for dashboards)
        cfg = model.config
        self.cfg = cfg
        self.flow = isinstance(cfg, JanusFlowConfig)
        if vae is not None and not self.flow:
            raise ConfigError("vae", "only JanusFlow decodes its samples with a VAE; a Janus-Pro model decodes with its own VQ")
        if self.flow and vae is None and "gen" in self.s.tasks and (data.gen or data.geneval):
            raise ConfigError("vae", "a JanusFlow model's gen samples are VAE latents: give the VAE it was trained with "
                              "(python -m janus_train.eval --vae DIR; in training, model.vae), or leave out the gen task")
        self.vae = vae
        self.system = conv.DEFAULT_SYSTEM_PROMPT if data.und_system_prompt == "default" else (data.und_system_prompt or None)
        self.image = im = ImageConfig.from_model(cfg)
        self.builder = DocBuilder(
            tok=self.tok, seq_len=data.seq_len, num_image_tokens=im.num_image_tokens, image_size=im.image_size,
            num_gen_tokens=im.num_gen_tokens, codebook_size=im.codebook_size, cfg_dropout=0.0, system_prompt=self.system,
            gen_kind=im.gen_kind, latent_shape=im.latent_shape, repa_image=im.repa_image,
        )

    # ---- loss --------------------------------------------------------------------------------
    def _documents(self, task: str) -> tuple[list[Doc], int]:
        docs, skipped = [], 0
        for key, parts in iter_samples([s.path for s in getattr(self.data, task)]):
            try:
                docs.append(self.builder.build(task, key, parts))
            except fmt.SampleError:
                skipped += 1
                continue
            if len(docs) >= self.s.num:
                break
        return docs, skipped

    def _rows(self, docs: list[Doc]) -> list[list[Doc]]:
        rows: list[list[Doc]] = []
        used = self.data.seq_len
        for d in docs:
            if used + d.n > self.data.seq_len:
                rows.append([])
                used = 0
            rows[-1].append(d)
            used += d.n
        return rows

    def _gen_scale(self) -> float:
        """The VAE scaling factor of the held-out JanusFlow gen sets (their janus meta), which
        must all hold latents of the model's shape from one VAE."""
        scales: dict[float, str] = {}
        for i, src in enumerate(self.data.gen):
            meta = read_janus_meta(src.path)
            shape, scale = meta.get("latent_shape"), meta.get("vae_scaling_factor")
            if shape is None or scale is None:
                raise ConfigError(f"data.gen[{i}].path", f"{src.path} holds no VAE latents (its janus meta lacks latent_shape / "
                                  "vae_scaling_factor): a JanusFlow model is evaluated on data_pipelines.pretokenize_vae shards")
            if tuple(shape) != tuple(self.image.latent_shape):
                raise ConfigError(f"data.gen[{i}].path", f"{src.path} holds latents {list(shape)}, the model takes {list(self.image.latent_shape)}")
            scales.setdefault(float(scale), src.path)
        if len(scales) > 1:
            raise ConfigError("data.gen", f"the gen sets were encoded with different VAEs (scaling factors {sorted(scales)})")
        return next(iter(scales))

    def _loss_names(self, task: str) -> tuple[str, ...]:
        """The losses a task's documents give: its CE; JanusFlow's gen documents flow and REPA."""
        return ("flow", "repa") if self.flow and task == "gen" else (task,)

    def _loss_sums(self, task: str, row: list[Doc]) -> tuple[dict[str, tuple[float, int]], int]:
        """({loss name: (summed loss, its count)}, tokens) of one packed row of documents:
        tokens are the supervised ones, or JanusFlow's latent tokens for gen."""
        batch = collate([Row(TASK_ID[task], row)], self.data.seq_len, self.tok.pad_id, self.tok.image_id, flow=self.flow)
        res = self.model(batch.to(self.ctx.device, self.ctx.dtype))
        if not self.flow:
            n = int(res.num_tokens[task])
            return {task: (float(res.loss_sum[task].double()), n)}, n
        sums = {k: (float(res.loss_sum[k].double()), int(res.count[k])) for k in self._loss_names(task)}
        return sums, int(batch.gen_input_mask.sum()) if task == "gen" else sums[task][1]

    @torch.no_grad()
    def loss(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for task in TASKS:
            if not getattr(self.data, task):
                continue
            docs, skipped = self._documents(task)
            if self.flow and task == "gen" and docs:
                scale, im = self._gen_scale(), self.image
                for d in docs:  # one fixed draw per document: the same at every evaluation
                    d.flow = flow_draw(self.s.seed, d.key, (0, 0), d.latent, scale, im.t_logit_mean, im.t_logit_std)
            rows = self._rows(docs)
            local = {i: self._loss_sums(task, rows[i]) for i in self.ctx.mine(len(rows))}
            results = self.ctx.gather(local)
            for name in self._loss_names(task):
                total = math.fsum(results[i][0][name][0] for i in range(len(rows)))
                count = sum(results[i][0][name][1] for i in range(len(rows)))
                out[f"loss_{name}"] = total / count if count else None
            out[f"tokens_{task}"] = sum(results[i][1] for i in range(len(rows)))
            out[f"docs_{task}"] = len(docs)
            if skipped:
                out[f"skipped_{task}"] = skipped
        return out

    # ---- understanding ---------------------------------------------------------------------------
    @torch.no_grad()
    def und(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.data.und:
            qs = und_questions([s.path for s in self.data.und], self.s.num)
            local = {}
            for i in self.ctx.mine(len(qs)):
                q = qs[i]
                img = Image.open(io.BytesIO(q.image))
                text, _ = answer(self.model, self.tok, img, turns=q.turns, system=self.system, max_new_tokens=self.s.max_new_tokens)
                local[i] = text
            preds = self.ctx.gather(local)
            rows = [{"key": q.key, "type": q.kind, "question": q.turns[-1]["content"], "reference": q.reference, "answer": preds[i],
                     "correct": normalise_answer(preds[i]) == normalise_answer(q.reference)} for i, q in enumerate(qs)]
            out["und_acc"] = float(np.mean([r["correct"] for r in rows])) if rows else None
            out["und_questions"] = len(rows)
            kinds = sorted({r["type"] for r in rows if r["type"]})
            out["und_acc_by_type"] = {k: float(np.mean([r["correct"] for r in rows if r["type"] == k])) for k in kinds}
            out["und_answers"] = rows
        if self.data.mmbench:
            out.update(self.mmbench())
        return out

    @torch.no_grad()
    def mmbench(self) -> dict[str, Any]:
        rows = read_mmbench(self.data.mmbench)
        local = {}
        for i in self.ctx.mine(len(rows)):
            local[i] = self._choose(rows[i])
        picks = self.ctx.gather(local)
        results = [{"index": r["index"], "category": r.get("category"), "answer": r["answer"].strip(), "prediction": picks[i],
                    "correct": picks[i] == r["answer"].strip()} for i, r in enumerate(rows)]
        cats = sorted({r["category"] for r in results if r["category"]})
        return {
            "mmbench_acc": float(np.mean([r["correct"] for r in results])) if results else None,
            "mmbench_questions": len(results),
            "mmbench_acc_by_category": {c: float(np.mean([r["correct"] for r in results if r["category"] == c])) for c in cats},
            "mmbench_predictions": results,
        }

    def _choose(self, row: dict[str, str]) -> str:
        """The option letter whose answer the model finds most likely (each option one
        document of one packed row, all with the image)."""
        question, letters = mmbench_prompt(row)
        try:
            image = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise ConfigError("mmbench", f"row index {row['index']}: the image is not base64 image data ({type(e).__name__})") from None
        from janus_train.contracts.preprocess import und_pixels

        pixels = und_pixels(image, self.cfg.vision.image_size)[None]
        docs = []
        for letter in letters:
            turns = [{"role": "user", "content": conv.IMAGE_SLOT + "\n" + question}, {"role": "assistant", "content": letter}]
            segments = conv.render_conversation(turns, self.cfg.num_image_tokens, system=self.system)
            ids, target = conversation_ids(self.tok, segments, self.cfg.num_image_tokens)
            # Score the letter's tokens, not the closing end-of-sentence token.
            target[-1] = False
            docs.append(Doc(key=letter, task=TASK_ID["und"], ids=np.asarray(ids, dtype=np.int32), target=np.asarray(target),
                            gen_start=len(ids), pixels=pixels))
        if self.flow:
            # JanusFlow's forward sums a row's und CE: one forward per option gives its score.
            scores = []
            for d in docs:
                batch = collate([Row(TASK_ID["und"], [d])], d.n, self.tok.pad_id, self.tok.image_id, flow=True)
                scores.append(-float(self.model(batch.to(self.ctx.device, self.ctx.dtype)).loss_sum["und"].double()))
            return letters[int(np.argmax(scores))]
        seq = sum(d.n for d in docs)
        batch = collate([Row(TASK_ID["und"], docs)], seq, self.tok.pad_id, self.tok.image_id).to(self.ctx.device, self.ctx.dtype)
        nll = self.model.token_losses(batch).reshape(-1).double().cpu()
        bounds = np.cumsum([0] + [d.n for d in docs])
        scores = [-float(nll[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        return letters[int(np.argmax(scores))]

    # ---- generation ----------------------------------------------------------------------------
    def _vae(self):
        """The VAE, loaded (on the context's device; bf16 when the model runs in bf16, else fp32:
        the SDXL-VAE overflows in fp16) and checked against the model once."""
        if isinstance(self.vae, (str, Path)):
            dtype = torch.bfloat16 if self.ctx.dtype == torch.bfloat16 else torch.float32
            try:
                vae = load_vae(self.vae, device=self.ctx.device, dtype=dtype)
                check_vae(vae, self.cfg)
            except ValueError as e:
                raise ConfigError("vae", str(e)) from None
            self.vae = vae
        return self.vae

    def _draw(self, caption: str, seed: int) -> np.ndarray:
        gen = torch.Generator(device=self.ctx.device).manual_seed(seed)
        if self.flow:
            fs = FlowSampleConfig(steps=self.s.flow_steps, cfg_weight=self.s.cfg)
            latents = generate_latents(self.model, self.tok, caption, 1, fs, generator=gen)
            return latents_to_images(self._vae(), latents)[0]
        sc = SampleConfig(cfg_weight=self.s.cfg, temperature=self.s.temperature)
        codes = generate_codes(self.model, self.tok, caption, 1, sc, generator=gen)
        with _gathered(self.model.vq, self.ctx.zero3):
            return codes_to_images(self.model, codes)[0]

    @torch.no_grad()
    def gen(self, out_dir: Path | None) -> tuple[dict[str, Any], Image.Image | None]:
        out: dict[str, Any] = {}
        grid = None
        if self.data.gen:
            prompts = gen_prompts([s.path for s in self.data.gen], self.s.num)
            local = {i: self._draw(prompts[i][1], self.s.seed + i) for i in self.ctx.mine(len(prompts))}
            images = self.ctx.gather(local)
            out["gen_prompts"] = len(prompts)
            grid = prompt_grid([images[i] for i in range(len(prompts))], [c for _, c in prompts])
            if self.s.scorer:
                from janus_train.eval.scorers import get_scorer

                score = get_scorer(self.s.scorer)
                scored = [score(images[i], prompts[i][1]) for i in range(len(prompts))]
                out["gen_scorer"] = self.s.scorer
                out["gen_acc"] = float(np.mean([r["shape_color"] for r in scored])) if scored else None
                out["gen_all_correct"] = float(np.mean([r["correct"] for r in scored])) if scored else None
                for attr in ("shape", "color", "position", "count", "background"):
                    vals = [r[attr] for r in scored if r.get(attr) is not None]
                    if vals:
                        out[f"gen_{attr}_acc"] = float(np.mean(vals))
                out["gen_samples"] = [{"key": k, "prompt": c, **{a: v for a, v in r.items()}} for (k, c), r in zip(prompts, scored)]
            if out_dir is not None and self.ctx.is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
                grid.save(out_dir / "gen_grid.png")
                out["gen_grid"] = str(out_dir / "gen_grid.png")
        if self.data.geneval:
            out.update(self.geneval(out_dir))
        return out, grid

    @torch.no_grad()
    def geneval(self, out_dir: Path | None) -> dict[str, Any]:
        """GenEval's layout: <out>/geneval/<index:05d>/metadata.jsonl (the prompt's metadata line)
        and samples/<k:05d>.png, which GenEval's evaluate_images.py reads as it is."""
        lines = [json.loads(line) for line in Path(self.data.geneval).read_text().splitlines() if line.strip()]
        for i, meta in enumerate(lines):
            if "prompt" not in meta:
                raise ConfigError("geneval", f"{self.data.geneval} line {i + 1} has no 'prompt'")
        k_per = self.s.geneval_samples
        jobs = [(i, k) for i in range(len(lines)) for k in range(k_per)]
        local = {j: self._draw(lines[jobs[j][0]]["prompt"], self.s.seed + 1000 * jobs[j][0] + jobs[j][1]) for j in self.ctx.mine(len(jobs))}
        images = self.ctx.gather(local)
        root = None
        if out_dir is not None and self.ctx.is_main:
            root = out_dir / "geneval"
            for i, meta in enumerate(lines):
                folder = root / f"{i:05d}"
                (folder / "samples").mkdir(parents=True, exist_ok=True)
                (folder / "metadata.jsonl").write_text(json.dumps(meta))
                for k in range(k_per):
                    Image.fromarray(images[i * k_per + k]).save(folder / "samples" / f"{k:05d}.png")
        return {"geneval_prompts": len(lines), "geneval_images": len(jobs), "geneval_folder": str(root) if root else None}

    # ---- all --------------------------------------------------------------------------------------
    def run(self, out_dir: str | Path | None = None) -> dict[str, Any]:
        """The report (the same on every rank); rank 0 writes `report.json` and the images."""
        out_dir = Path(out_dir) if out_dir is not None else None
        was_training = self.model.training
        self.model.eval()
        t0 = time.monotonic()
        report: dict[str, Any] = {"tasks": list(self.s.tasks), "und_system_prompt": self.system}
        try:
            if "loss" in self.s.tasks:
                report.update(self.loss())
            if "und" in self.s.tasks:
                report.update(self.und())
            if "gen" in self.s.tasks:
                gen, grid = self.gen(out_dir)
                report.update(gen)
                self.grid = grid
        finally:
            self.model.train(was_training)
        report["eval_seconds"] = time.monotonic() - t0
        if out_dir is not None and self.ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report


def summary(report: dict[str, Any]) -> dict[str, float]:
    """The report's headline numbers (what metrics.jsonl and W&B get as eval/<name>)."""
    keys = ("loss_und", "loss_text", "loss_gen", "loss_flow", "loss_repa", "und_acc", "mmbench_acc", "gen_acc", "gen_all_correct")
    out = {k: report[k] for k in keys if isinstance(report.get(k), (int, float))}
    for kind, acc in (report.get("und_acc_by_type") or {}).items():
        out[f"und_acc_{kind}"] = acc
    return out


def _gathered(module: torch.nn.Module, zero3: bool):
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


__all__ = ["EvalContext", "Evaluator", "normalise_answer", "read_mmbench", "summary"]
