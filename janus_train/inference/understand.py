"""Image understanding: answer a question about an image, greedy by default, with a KV cache."""

from __future__ import annotations

import torch
from PIL import Image

from janus_train.contracts.conversation import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, und_prompt
from janus_train.contracts.preprocess import und_pixels


@torch.no_grad()
def answer(
    model,
    tokenizer,
    image: Image.Image,
    question: str,
    max_new_tokens: int = 256,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[str, list[int]]:
    """(answer text, generated token ids). temperature 0 means greedy."""
    cfg = model.config
    device = model.llm.embed_tokens.weight.device
    ids = tokenizer(und_prompt(question, cfg.num_image_tokens, system=system)).input_ids
    ids_t = torch.tensor([ids], device=device)
    image_mask = ids_t == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
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
        if tok_id == tokenizer.eos_token_id:
            break
        out.append(tok_id)
        hidden = model.decode_step(model.llm.embed_tokens(nxt[:, None]), cache)
    return tokenizer.decode(out, skip_special_tokens=True).strip(), out
