"""What the model side needs from a tokenizer, and the one way a conversation becomes ids.

Training (data/tokenize.py), evaluation and inference all turn a rendered conversation into
token ids with `conversation_ids`: BOS, then every segment tokenised on its own (so the loss
mask follows segment boundaries exactly), each image slot as BOI + IMAGE x N + EOI. A prompt
at inference time is therefore exactly the prefix the model was trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

from janus_train.contracts import conversation as conv


def tokenizer_fingerprint(backend: Any) -> str:
    """A short hash of a `tokenizers.Tokenizer` (vocab, merges, special tokens)."""
    return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]


@dataclass
class TokenizerInfo:
    """What the data path needs from a tokenizer; picklable (goes to worker processes)."""

    backend: Any  # tokenizers.Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int
    image_id: int
    boi_id: int
    eoi_id: int
    fingerprint: str

    @classmethod
    def from_hf(cls, tokenizer: Any) -> "TokenizerInfo":
        """From a transformers fast tokenizer (or a path to load one from)."""
        if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; the data path needs one")
        # Our own copy without truncation/padding: length rules are applied per document here.
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
        ids = {}
        for name, tok in (
            ("bos", conv.BOS_TOKEN),
            ("eos", conv.EOS_TOKEN),
            ("pad", conv.PAD_TOKEN),
            ("image", conv.IMAGE_TOKEN),
            ("boi", conv.BOI_TOKEN),
            ("eoi", conv.EOI_TOKEN),
        ):
            i = backend.token_to_id(tok)
            if i is None:
                raise ValueError(f"tokenizer has no {tok!r} token ({name}); is it a Janus tokenizer?")
            ids[f"{name}_id"] = int(i)
        return cls(backend=backend, fingerprint=tokenizer_fingerprint(backend), **ids)

    @classmethod
    def of(cls, tokenizer: Any) -> "TokenizerInfo":
        """`tokenizer` itself if it is one, else from a transformers fast tokenizer or a path."""
        return tokenizer if isinstance(tokenizer, cls) else cls.from_hf(tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids


def conversation_ids(
    tok: TokenizerInfo, segments: list[conv.Segment], num_image_tokens: int, encode: Callable[[conv.Segment], list[int]] | None = None
) -> tuple[list[int], list[bool]]:
    """(ids, target) of rendered segments: target[i] says whether ids[i] is a loss target."""
    ids = [tok.bos_id]
    target = [False]
    image_slot = [tok.boi_id] + [tok.image_id] * num_image_tokens + [tok.eoi_id]
    for seg in segments:
        part = image_slot if seg.image else (encode(seg) if encode is not None else tok.encode(seg.text))
        ids.extend(part)
        target.extend([seg.loss] * len(part))
    return ids, target


def und_prompt_ids(
    tok: TokenizerInfo, turns: list[dict[str, str]], num_image_tokens: int, system: str | None = conv.DEFAULT_SYSTEM_PROMPT
) -> list[int]:
    """Ids of a conversation so far (ending with a user turn) plus the assistant prompt, which
    the model continues with its answer. `<image>` in a user turn places the image."""
    segments = conv.render_conversation(turns, num_image_tokens, system=system, add_generation_prompt=True)
    return conversation_ids(tok, segments, num_image_tokens)[0]
