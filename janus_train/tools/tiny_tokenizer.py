"""A tiny byte-level BPE tokenizer with the Janus special tokens and chat template.

Trained with `tokenizers` on a small built-in corpus (the shapes-world vocabulary plus common
English), so tests and the demo tokenise like the released tokenizer does (special tokens
are single ids, BOS is prepended, the chat template renders the DeepSeek format) without
any model hub.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from janus_train.checkpoint import processor as processor_files
from janus_train.contracts import conversation as conv

from janus_train.eval.shapes import COLORS, POSITIONS, SHAPES  # noqa: E402 - the shapes world's vocabulary

PLACES = sorted({w for p in POSITIONS for w in p.split()} | {"corner", "middle", "upper", "lower"})
WORDS = (
    "a an the is are of on in at to and with there what which how many where image picture photo shows "
    "background large small big tiny one two three four five six seven eight nine ten color shape an object "
    "describe this that it its has have question answer yes no please draw generate create near next "
    "above below beside between some several only no none count number left right side object objects "
    "you can see I there's here scene simple plain solid bright dark light pale deep"
).split()

# The DeepSeek conversation format as training renders it (checkpoint/processor.py).
CHAT_TEMPLATE = processor_files.CHAT_TEMPLATE


def corpus() -> list[str]:
    lines = []
    for color, shape, place in itertools.product(COLORS, SHAPES, PLACES):
        lines.append(f"A {color} {shape} on the {place} of a plain background.")
        lines.append(f"What color is the {shape}? The {shape} is {color}.")
        lines.append(f"What shape is the {color} object? It is a {shape}.")
    for n in range(1, 11):
        lines.append(f"There are {n} shapes in the image. How many objects can you see? I can see {n}.")
    lines.append(" ".join(WORDS))
    lines.append("0123456789 .,:;!?'\"()-_/\n")
    return lines


def build_tokenizer(vocab_size: int = 1000):
    """A transformers PreTrainedTokenizerFast; every special token is one id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(conv.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=conv.BOS_TOKEN,
        eos_token=conv.EOS_TOKEN,
        pad_token=conv.PAD_TOKEN,
        additional_special_tokens=[t for t in conv.SPECIAL_TOKENS if t not in (conv.BOS_TOKEN, conv.EOS_TOKEN, conv.PAD_TOKEN)],
        extra_special_tokens={"image_token": conv.IMAGE_TOKEN, "boi_token": conv.BOI_TOKEN, "eoi_token": conv.EOI_TOKEN},
        model_max_length=16384,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    # The released tokenizer prepends BOS; a bare BPE tokenizer would not.
    from tokenizers import processors

    bos_id = fast.convert_tokens_to_ids(conv.BOS_TOKEN)
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{conv.BOS_TOKEN} $A", pair=f"{conv.BOS_TOKEN} $A $B", special_tokens=[(conv.BOS_TOKEN, bos_id)]
    )
    fast.add_bos_token = True
    return fast


def save_tokenizer_and_processor(out_dir: str | Path, image_size: int, num_image_tokens: int):
    """Write tokenizer + JanusImageProcessor/JanusProcessor configs into out_dir."""
    from transformers import JanusProcessor

    try:  # the PIL backend needs no torchvision (which cannot be installed beside CPU torch here)
        from transformers import JanusImageProcessorPil as JanusImageProcessor
    except ImportError:
        from transformers import JanusImageProcessor

    tok = build_tokenizer()
    # Janus-Pro ships SigLIP statistics (mean = std = 0.5, so the pad colour is 127), not the
    # CLIP defaults the class falls back to.
    image_processor = JanusImageProcessor(
        size={"height": image_size, "width": image_size}, min_size=14, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    # Training and `python -m janus_train.chat` put DeepSeek's default system prompt first;
    # with use_default_system_prompt, JanusProcessor does too (for text generation).
    processor = JanusProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE,
        use_default_system_prompt=True, num_image_tokens=num_image_tokens,
    )
    processor.save_pretrained(str(out_dir))
    return tok
