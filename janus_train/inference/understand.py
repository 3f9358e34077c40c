"""Image understanding: answer a question about an image, greedy by default, with a KV cache.

The prompt is built exactly as training builds und documents (`contracts/tokens.py`), so a
model trained with janus-train sees at inference the very prefix it was trained on. Either
family: Janus-Pro's image features fill the image's placeholder positions; JanusFlow's
`embed_und_images` gives its learned begin embedding first, which fills the <begin_of_image>
position before the placeholders (as DeepSeek's JanusFlow processor masks them).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from janus_train.contracts.conversation import DEFAULT_SYSTEM_PROMPT, IMAGE_SLOT
from janus_train.contracts.preprocess import und_pixels
from janus_train.contracts.tokens import TokenizerInfo, und_prompt_ids
from janus_train.models.janusflow.config import JanusFlowConfig


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


def und_image_mask(ids: torch.Tensor, tok: TokenizerInfo, with_begin: bool) -> torch.Tensor:
    """bool, ids' shape: the positions an und image's embeddings fill, in order: its
    placeholders, and with `with_begin` (JanusFlow) also the <begin_of_image> right before them."""
    mask = ids == tok.image_id
    if with_begin:
        begin = torch.zeros_like(mask)
        begin[..., :-1] = (ids[..., :-1] == tok.boi_id) & mask[..., 1:]
        mask = mask | begin
    return mask


def embed_prompt(model, tokenizer: Any, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The LLM's inputs [B, S, H] for ids [B, S] with und images pixels [N, 3, H, W] (in order):
    token embeddings, the images' embeddings in their positions (`und_image_mask`)."""
    tok = TokenizerInfo.of(tokenizer)
    mask = und_image_mask(ids, tok, with_begin=isinstance(model.config, JanusFlowConfig))
    embeds = model.llm.embed_tokens(ids.masked_fill(mask, 0))
    feats = model.embed_und_images(pixels)
    if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
        raise ValueError(f"the prompt has {int(mask.sum())} image positions but {feats.shape[0]} image(s) give "
                         f"{feats.shape[0] * feats.shape[1]} embeddings; does the tokenizer match the model?")
    return embeds.masked_scatter(mask[..., None], feats.reshape(-1, embeds.shape[-1]).to(embeds.dtype))


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
    pixels = und_pixels(image.convert("RGB"), cfg.vision.image_size)[None].to(device, model.vision.patch_embed.weight.dtype)
    embeds = embed_prompt(model, tok, ids_t, pixels)
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
