"""Text-to-image sampling with classifier-free guidance and a KV cache.

Rows are laid out as HF transformers and DeepSeek do: the N conditional rows first, then N
unconditional rows whose prompt tokens (all but BOS and <begin_of_image>) are replaced by the
pad token. At every step the gen head's logits are combined as u + w * (c - u), divided by
the temperature, optionally top-k filtered, and sampled (or argmax'ed when greedy). Both
halves are then fed the same sampled code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from janus_train.contracts.conversation import gen_prompt
from janus_train.contracts.tokens import TokenizerInfo


@dataclass
class SampleConfig:
    cfg_weight: float = 5.0
    temperature: float = 1.0
    top_k: int | None = None
    greedy: bool = False

    def validate(self) -> "SampleConfig":
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy for argmax")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        return self


def prompt_ids(tokenizer, caption: str) -> list[int]:
    """BOS + the gen prompt, tokenised as training tokenises gen documents (data/tokenize.py)."""
    tok = TokenizerInfo.of(tokenizer)
    ids = [tok.bos_id] + tok.encode(gen_prompt(caption))
    if ids[-1] != tok.boi_id:
        raise ValueError("the generation prompt must end with <begin_of_image>; check the tokenizer")
    return ids


def unconditional_ids(ids: list[int], bos_id: int, boi_id: int, pad_id: int) -> list[int]:
    return [t if t in (bos_id, boi_id) else pad_id for t in ids]


def guided_logits(logits: torch.Tensor, cfg_weight: float) -> torch.Tensor:
    """[2N, V] rows (cond block, then uncond block) -> [N, V] guided logits."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_weight * (cond - uncond)


def pick_next(logits: torch.Tensor, sc: SampleConfig, generator: torch.Generator | None) -> torch.Tensor:
    if sc.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sc.temperature if sc.temperature != 1.0 else logits
    if sc.top_k is not None and sc.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sc.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_codes(
    model,
    tokenizer,
    caption: str,
    num_images: int = 1,
    sample: SampleConfig | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """long [num_images, num_image_tokens] VQ codes for `caption`."""
    sc = (sample or SampleConfig()).validate()
    device = model.llm.embed_tokens.weight.device
    tok = TokenizerInfo.of(tokenizer)
    ids = prompt_ids(tok, caption)
    uncond = unconditional_ids(ids, tok.bos_id, tok.boi_id, tok.pad_id)
    rows = torch.tensor([ids] * num_images + [uncond] * num_images, device=device)
    n_codes = model.config.num_image_tokens
    cache = model.new_cache(rows.shape[0], rows.shape[1] + n_codes)
    hidden = model.decode_step(model.llm.embed_tokens(rows), cache)
    codes = torch.empty(num_images, n_codes, dtype=torch.long, device=device)
    steps = range(n_codes)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="sampling codes", unit="tok")
    for i in steps:
        logits = model.gen_logits(hidden[:, -1]).float()
        nxt = pick_next(guided_logits(logits, sc.cfg_weight), sc, generator)
        codes[:, i] = nxt
        if i + 1 < n_codes:
            emb = model.embed_gen_codes(torch.cat([nxt, nxt])[:, None])
            hidden = model.decode_step(emb, cache)
    return codes


@torch.no_grad()
def codes_to_images(model, codes: torch.Tensor) -> np.ndarray:
    """uint8 [N, H, W, 3] images from VQ codes."""
    pixels = model.vq.decode_codes(codes).float()
    arr = ((pixels.permute(0, 2, 3, 1) + 1.0) / 2.0 * 255.0).clamp(0, 255)
    return arr.to(torch.uint8).cpu().numpy()


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tile [N, H, W, 3] into one [rows*H, cols*W, 3] image."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return grid


def prompt_grid(images: list[np.ndarray], prompts: list[str], cols: int = 8, min_side: int = 128) -> Image.Image:
    """Images in a grid, each prompt written under its image."""
    if not images:
        return Image.new("RGB", (min_side, min_side), "white")
    side = max(min_side, images[0].shape[0])
    font = ImageFont.load_default()
    chars = max(8, side // 6)
    wrapped = ["\n".join(_wrap(p, chars)[:4]) for p in prompts]
    text_h = 4 + 12 * max(len(w.splitlines()) for w in wrapped)
    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * side, rows * (side + text_h)), "white")
    d = ImageDraw.Draw(canvas)
    for i, (img, text) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, cols)
        x, y = c * side, r * (side + text_h)
        canvas.paste(Image.fromarray(img).resize((side, side), Image.NEAREST), (x, y))
        d.multiline_text((x + 2, y + side + 2), text, fill="black", font=font, spacing=2)
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return lines + ([line] if line else [])
