"""Image understanding: answer a question about an image, greedy by default, with a KV cache.

The prompt is built exactly as training builds und documents (`contracts/tokens.py`), so a
model trained with janus-train sees at inference the very prefix it was trained on.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from janus_train.contracts.conversation import DEFAULT_SYSTEM_PROMPT, IMAGE_SLOT
from janus_train.contracts.preprocess import und_pixels
from janus_train.contracts.tokens import TokenizerInfo, und_prompt_ids


def prompt_ids(tokenizer: Any, num_image_tokens: int, question: str | None = None, turns: list[dict[str, str]] | None = None,
               system: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """The ids the model continues: one question about the image, or a conversation so far
    (`turns`, ending with a user turn; `<image>` marks the image, else it precedes the first
    user turn's text)."""
    tok = TokenizerInfo.of(tokenizer)
    if turns is None:
        turns = [{"role": "user", "content": question or ""}]
    turns = [dict(t) for t in turns]
    if not any(IMAGE_SLOT in t["content"] for t in turns):
        first = next(i for i, t in enumerate(turns) if t["role"] == "user")
        turns[first]["content"] = IMAGE_SLOT + "\n" + turns[first]["content"]
    return und_prompt_ids(tok, turns, num_image_tokens, system=system)


@torch.no_grad()
def answer(
    model,
    tokenizer,
    image: Image.Image,
    question: str | None = None,
    max_new_tokens: int = 256,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    turns: list[dict[str, str]] | None = None,
) -> tuple[str, list[int]]:
    """(answer text, generated token ids). temperature 0 means greedy."""
    tok = TokenizerInfo.of(tokenizer)
    cfg = model.config
    device = model.llm.embed_tokens.weight.device
    ids = prompt_ids(tok, cfg.num_image_tokens, question, turns, system)
    ids_t = torch.tensor([ids], device=device)
    image_mask = ids_t == tok.image_id
    pixels = und_pixels(image.convert("RGB"), cfg.vision.image_size)[None].to(device, model.vision.patch_embed.weight.dtype)
    embeds = model.llm.embed_tokens(ids_t.masked_fill(image_mask, 0))
    feats = model.embed_und_images(pixels).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    embeds = embeds.masked_scatter(image_mask[..., None], feats)
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    hidden = model.decode_step(embeds, cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.text_logits(hidden[:, -1]).float()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        tok_id = int(nxt)
        if tok_id == tok.eos_id:
            break
        out.append(tok_id)
        hidden = model.decode_step(model.llm.embed_tokens(nxt[:, None]), cache)
    return tok.decode(out).strip(), out
