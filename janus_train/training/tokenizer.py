"""Training the image tokenizer a model generates through, at small sizes, on your images.

The released Janus models ship a trained tokenizer (LlamaGen's VQ-16 for Janus-Pro, the
SDXL VAE for JanusFlow); a tiny model for tests, demos and experiments needs its own, or its
generations decode to noise. This trains the *same module* the model uses (`VQTokenizer` of
models/janus/vq.py at a small width), so pre-tokenisation and decoding stay the real code paths.

The VQ objective is LlamaGen's without its perceptual and adversarial terms (they need
pretrained networks, which we cannot download here, and a GAN is not stable in minutes):

    loss = ||x - D(q)||^2 + |x - D(q)| + |grad x - grad D(q)|  +  ||sg(z) - q||^2  +  beta ||z - sg(q)||^2

the gradient term compares pixel differences (sharp edges), z the encoder output per position, q its nearest codebook entry (both l2-normalised, as the
model looks codes up by cosine), sg stop-gradient, the decoder fed z + sg(q - z) (straight-
through). Codes unused for `restart_every` steps are restarted at encoder outputs of the
current batch, which keeps the whole codebook in use (a common VQ remedy; LlamaGen relies on a
large batch and many steps instead).

The VAE kind (JanusFlow) trains diffusers' `AutoencoderKL` at a small width with the same pixel
losses on a decoded posterior sample plus a KL term (`vae_losses`), and sets its scaling factor
from the data.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from janus_train.contracts.preprocess import gen_crop, open_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ---- images ----------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """uint8 [N, 3, S, S] images after the gen preprocessing, with captions where known."""

    pixels: torch.Tensor
    captions: list[str | None]
    names: list[str]

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def split(self, held_out: int) -> tuple["ImageSet", "ImageSet"]:
        """(training set, the last `held_out` images)."""
        k = len(self) - held_out
        return (ImageSet(self.pixels[:k], self.captions[:k], self.names[:k]),
                ImageSet(self.pixels[k:], self.captions[k:], self.names[k:]))


def _iter_sources(source: Path) -> Iterator[tuple[str, bytes, str | None]]:
    """(name, image bytes, caption or None) from a folder, a jsonl manifest or a shard dir."""
    if source.is_file() and source.suffix == ".jsonl":
        base = source.parent
        for line in source.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if "image" not in row:
                continue
            path = base / row["image"]
            if path.is_file():
                yield str(row.get("key", path.stem)), path.read_bytes(), row.get("caption")
        return
    if source.is_dir() and (source / ".nv-meta").is_dir():
        from janus_train.data import formats as fmt
        from janus_train.data.shards import ShardReader, dataset_shards

        reader = ShardReader()
        for shard in dataset_shards(source):
            for raw in reader.read(shard.path, 0, shard.count):
                if raw.parts is None:
                    continue
                image = fmt.image_part(raw.parts)
                if image is None:
                    continue
                caption = None
                if "json" in raw.parts:
                    try:
                        caption = fmt.parse_json(raw.parts["json"]).get("caption")
                    except fmt.SampleError:
                        pass
                yield raw.key, image, caption
        return
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = path.with_suffix(".txt")
            yield str(path.relative_to(source)), path.read_bytes(), txt.read_text().strip() if txt.is_file() else None
        return
    raise FileNotFoundError(f"{source}: not an image folder, a .jsonl manifest or a shard directory")


def load_images(source: str | Path, size: int, limit: int | None = None, progress: bool = True) -> ImageSet:
    """Decode and gen-preprocess (short side to `size`, centre crop) up to `limit` images."""
    from tqdm import tqdm

    pixels, captions, names = [], [], []
    skipped = 0
    bar = tqdm(desc="images", unit="img", disable=not progress, total=limit)
    for name, data, caption in _iter_sources(Path(source)):
        try:
            img = gen_crop(open_rgb(data), size)
        except Exception:  # noqa: BLE001 - an undecodable image is skipped and counted
            skipped += 1
            continue
        pixels.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        captions.append(caption)
        names.append(name)
        bar.update()
        if limit is not None and len(pixels) >= limit:
            break
    bar.close()
    if not pixels:
        raise ValueError(f"{source}: no readable images ({skipped} skipped)")
    return ImageSet(torch.stack(pixels), captions, names)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float [-1, 1] (the gen preprocessing's scale)."""
    return pixels.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, S, S] in about [-1, 1] -> uint8 [B, S, S, 3]."""
    return ((x.detach().float().permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


# ---- the VQ objective --------------------------------------------------------------------------


@dataclass
class VQLosses:
    total: torch.Tensor
    reconstruction: torch.Tensor
    codebook: torch.Tensor
    commitment: torch.Tensor
    codes: torch.Tensor  # long [B*h*w]
    latents: torch.Tensor  # [B*h*w, code_dim], normalised like the codebook


def _edge_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences: it penalises blurred edges,
    which the pixel losses barely do (a cheap stand-in for the perceptual loss we cannot use)."""
    return F.l1_loss(a.diff(dim=-1), b.diff(dim=-1)) + F.l1_loss(a.diff(dim=-2), b.diff(dim=-2))


def vq_losses(vq: torch.nn.Module, x: torch.Tensor, beta: float, edge_weight: float = 1.0) -> tuple[VQLosses, torch.Tensor]:
    """The objective above for a batch x in [-1, 1]; returns (losses, reconstruction)."""
    z = vq.quant_conv(vq.encoder(x))
    b, c, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)
    book = vq.codebook.weight
    if vq.cfg.codebook_l2_norm:
        flat = F.normalize(flat, dim=-1)
        book = F.normalize(book, dim=-1)
    with torch.no_grad():
        codes = ((book * book).sum(1)[None] - 2.0 * flat @ book.t()).argmin(1)
    q = book[codes]
    codebook = F.mse_loss(q, flat.detach())
    commitment = F.mse_loss(flat, q.detach())
    zq = (flat + (q - flat).detach()).view(b, h, w, c).permute(0, 3, 1, 2)
    recon = vq.decoder(vq.post_quant_conv(zq))
    rec = F.mse_loss(recon, x) + F.l1_loss(recon, x) + edge_weight * _edge_loss(recon, x)
    total = rec + codebook + beta * commitment
    return VQLosses(total, rec, codebook, commitment, codes, flat.detach()), recon


# ---- training -----------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    minutes: float | None = 5.0  # wall-clock budget (the step count decides if None)
    steps: int | None = None
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    beta: float = 0.25  # commitment weight (LlamaGen's)
    restart_every: int = 50  # restart codes unused over this many steps (0: never)
    decay: bool = False  # cosine lr decay to 10% over the budget
    edge_weight: float = 1.0  # weight of the image-gradient (edge) loss
    seed: int = 0
    threads: int | None = None


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _train_loop(model: torch.nn.Module, images: ImageSet, s: TrainSettings, batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
                after_step: Callable[[int, torch.Generator], None] | None, progress: bool,
                on_step: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
    """AdamW on `model` until the minutes or the steps run out: warmup (and optional cosine
    decay), random batches with random horizontal flips, `batch_loss(x) -> (loss, record)`;
    `after_step(step, generator)` draws from the loop's own random stream."""
    from tqdm import tqdm

    if s.minutes is None and s.steps is None:
        raise ValueError("give a time budget (minutes) or a step count")
    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    n = len(images)
    model.train()
    t0 = time.monotonic()
    deadline = None if s.minutes is None else t0 + 60.0 * s.minutes
    result = TrainResult(0, 0.0)
    bar = tqdm(total=s.steps, desc="tokenizer", unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    while (s.steps is None or step < s.steps) and (deadline is None or time.monotonic() < deadline):
        # Linear warmup, then a cosine decay to 10% over the budget (steps, or elapsed time).
        done = step / s.steps if s.steps else (time.monotonic() - t0) / (60.0 * s.minutes)
        factor = min(1.0, (step + 1) / max(1, s.warmup_steps))
        if s.decay:
            factor *= 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done)))
        for group in opt.param_groups:
            group["lr"] = s.lr * factor
        idx = torch.randint(0, n, (min(s.batch_size, n),), generator=gen)
        x = to_model_range(images.pixels[idx])
        # Random flips: the world has no preferred left/right, and the tokenizer sees more.
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        loss, rec = batch_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if after_step is not None:
            after_step(step, gen)
        rec = {"step": step, **rec}
        result.history.append(rec)
        if on_step is not None:
            on_step(step, rec)
        bar.update()
        bar.set_postfix(rec=f"{rec['reconstruction']:.4f}", refresh=False)
    bar.close()
    model.eval()
    result.steps = step
    result.seconds = time.monotonic() - t0
    return result


def train_vq(vq: torch.nn.Module, images: ImageSet, s: TrainSettings, progress: bool = True,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train `vq` in place on `images` (uint8) until the minutes or the steps run out."""
    k = vq.cfg.codebook_size
    last_used = torch.zeros(k, dtype=torch.long)
    latest: dict[str, VQLosses] = {}

    def batch_loss(x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        losses, _ = vq_losses(vq, x, s.beta, s.edge_weight)
        latest["losses"] = losses
        used = torch.bincount(losses.codes, minlength=k) > 0
        return losses.total, {"loss": float(losses.total.detach()), "reconstruction": float(losses.reconstruction.detach()),
                              "codebook": float(losses.codebook.detach()), "commitment": float(losses.commitment.detach()),
                              "batch_codes_used": float(used.float().mean())}

    @torch.no_grad()
    def restart_dead_codes(step: int, gen: torch.Generator) -> None:
        losses = latest["losses"]
        last_used[torch.bincount(losses.codes, minlength=k) > 0] = step
        if s.restart_every and step % s.restart_every == 0:
            dead = (step - last_used >= s.restart_every).nonzero(as_tuple=True)[0]
            if dead.numel():
                pick = torch.randint(0, losses.latents.shape[0], (dead.numel(),), generator=gen)
                vq.codebook.weight[dead] = losses.latents[pick].to(vq.codebook.weight.dtype)
                last_used[dead] = step

    return _train_loop(vq, images, s, batch_loss, restart_dead_codes, progress, on_step)


# ---- the VAE objective (JanusFlow's kind) --------------------------------------------------------


def tiny_vae(latent_channels: int = 4, downsample: int = 8, width: int = 32, sample_size: int = 64):
    """diffusers' `AutoencoderKL` (the SDXL-VAE's class) at a small width: the same encode /
    latent_dist / decode code paths as the real one. `downsample` = 2 ** (levels - 1)."""
    from diffusers import AutoencoderKL

    levels = int(math.log2(downsample)) + 1
    if 2 ** (levels - 1) != downsample:
        raise ValueError(f"downsample={downsample} must be a power of two")
    channels = tuple(width * min(2 ** (i // 2), 2) for i in range(levels))
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=channels, norm_num_groups=min(8, width), sample_size=sample_size,
                         scaling_factor=1.0)


def vae_losses(vae: torch.nn.Module, x: torch.Tensor, kl_weight: float, edge_weight: float,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The VQ's pixel losses on a decoded posterior sample, plus kl_weight x KL(q(z|x) || N(0, I))
    summed over a sample's latent and divided by its pixel values (the SD-VAE's balance, with
    the pixel terms as means)."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    rec = F.mse_loss(recon, x) + F.l1_loss(recon, x) + edge_weight * _edge_loss(recon, x)
    kl = posterior.kl().mean() / x[0].numel()
    total = rec + kl_weight * kl
    return total, {"loss": float(total.detach()), "reconstruction": float(rec.detach()), "kl": float(kl.detach())}


def train_vae(vae: torch.nn.Module, images: ImageSet, s: TrainSettings, kl_weight: float = 1e-4, progress: bool = True,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a diffusers `AutoencoderKL` in place; then set its `scaling_factor` to 1 / the std of
    the training images' latent means (how SD's VAEs set theirs), so scaled latents have unit
    variance, as rectified flow's noise does."""
    gen = torch.Generator().manual_seed(s.seed + 2)
    result = _train_loop(vae, images, s, lambda x: vae_losses(vae, x, kl_weight, s.edge_weight, gen), None, progress, on_step)
    with torch.no_grad():
        sample = images.pixels[: min(len(images), 512)]
        means = torch.cat([vae.encode(to_model_range(sample[i : i + 64])).latent_dist.mean for i in range(0, sample.shape[0], 64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std().clamp(min=1e-6)))
    return result


def _is_vq(model: torch.nn.Module) -> bool:
    return hasattr(model, "encode_codes")


@torch.no_grad()
def reconstruct(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 reconstructions [N, S, S, 3], codes [N, h*w] or latent means [N, C, h, w]) through
    exactly the path pre-tokenisation and sampling take: encode_codes/decode_codes for a VQ, the
    posterior mean and decode for a VAE."""
    out, enc = [], []
    for i in range(0, pixels.shape[0], batch_size):
        x = to_model_range(pixels[i : i + batch_size])
        if _is_vq(model):
            c = model.encode_codes(x)
            out.append(to_uint8(model.decode_codes(c)))
        else:
            c = model.encode(x).latent_dist.mean
            out.append(to_uint8(model.decode(c).sample))
        enc.append(c)
    return np.concatenate(out), torch.cat(enc)


def reconstruction_report(model: torch.nn.Module, held_out: ImageSet, scorer: str | None = None) -> dict[str, Any]:
    """Held-out reconstruction quality, codebook use (VQ) or latent statistics (VAE), and (with a
    scorer and captions) how often the scorer recognises the captioned shape and colour in
    originals and reconstructions."""
    recon, enc = reconstruct(model, held_out.pixels)
    orig = held_out.pixels.permute(0, 2, 3, 1).numpy()
    mse = float(((recon.astype(np.float64) - orig) ** 2).mean())
    report: dict[str, Any] = {"images": len(held_out), "mse": mse, "psnr_db": 10 * math.log10(255.0**2 / max(mse, 1e-12))}
    if _is_vq(model):
        counts = torch.bincount(enc.reshape(-1), minlength=model.cfg.codebook_size).double()
        p = counts / counts.sum()
        report.update(codebook_used=float((counts > 0).double().mean()),
                      codebook_perplexity=float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    else:
        scale = float(model.config.scaling_factor)
        report.update(latent_shape=list(enc.shape[1:]), latent_mean=float(enc.mean()), latent_std=float(enc.std()),
                      scaling_factor=scale, scaled_latent_std=float(enc.std() * scale))
    if scorer is not None:
        from janus_train.eval.scorers import get_scorer

        score = get_scorer(scorer)
        pairs = [(i, c) for i, c in enumerate(held_out.captions) if c]
        if pairs:
            hit = lambda img, cap: bool(score(img, cap)["shape_color"])  # noqa: E731
            on_orig = sum(hit(orig[i], c) for i, c in pairs) / len(pairs)
            on_recon = sum(hit(recon[i], c) for i, c in pairs) / len(pairs)
            report.update(scorer=scorer, scored_images=len(pairs), scorer_rate_originals=on_orig,
                          scorer_rate_reconstructions=on_recon,
                          reconstruction_vs_original=on_recon / on_orig if on_orig else None)
    return report


def comparison_grid(originals: torch.Tensor, recon: np.ndarray, n: int = 16) -> Image.Image:
    """Originals (top row) above their reconstructions (bottom row)."""
    a = originals[:n].permute(0, 2, 3, 1).numpy()
    b = recon[:n]
    return Image.fromarray(np.concatenate([np.concatenate(list(a), axis=1), np.concatenate(list(b), axis=1)], axis=0))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
