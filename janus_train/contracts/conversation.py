"""The Janus chat format, as text segments that know whether they carry loss.

DeepSeek's released processor (sft format "deepseek") renders a conversation as

    [system + "\\n\\n"] "<|User|>: " user "\\n\\n" "<|Assistant|>: " answer "<｜end▁of▁sentence｜>" ...

and expands each image slot to <begin_of_image> + <image_placeholder> x N + <end_of_image>.
Generation prompts end with "<|Assistant|>:" followed by <begin_of_image>, after which the
VQ codes follow. The BOS token is added by the tokenizer, not written here.

Training code tokenises the segments one by one so that the loss mask follows segment
boundaries exactly; inference joins them.
"""

from __future__ import annotations

from dataclasses import dataclass

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
# Tokens the released tokenizer registers as special; the tiny tokenizer carries all of them
# so that tokenisation behaves the same on both.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IMAGE_TOKEN,
    BOI_TOKEN,
    EOI_TOKEN,
    "<patch_placeholder>",
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    USER_ROLE,
    ASSISTANT_ROLE,
)
SEP = "\n\n"
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
# In conversation text, this marker stands for one image slot.
IMAGE_SLOT = "<image>"


@dataclass(frozen=True)
class Segment:
    """A piece of rendered conversation text; `loss` says whether its tokens are targets."""

    text: str
    loss: bool = False
    image: bool = False  # an expanded image slot: BOI + IMAGE_TOKEN x N + EOI


def image_slot_text(num_image_tokens: int) -> str:
    return BOI_TOKEN + IMAGE_TOKEN * num_image_tokens + EOI_TOKEN


def render_conversation(
    turns: list[dict[str, str]],
    num_image_tokens: int,
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> list[Segment]:
    """Render [{"role": "user"|"assistant", "content": str}, ...] to segments.

    `IMAGE_SLOT` ("<image>") in a user turn marks where an image goes. Assistant contents and
    their closing EOS carry loss; everything else does not. With `add_generation_prompt`, the
    text ends with "<|Assistant|>:" so a model continues with the answer.
    """
    segments: list[Segment] = []
    if system:
        segments.append(Segment(system + SEP))
    for i, turn in enumerate(turns):
        role = turn.get("role")
        content = turn.get("content", "")
        if role == "user":
            segments.append(Segment(USER_ROLE + ": "))
            parts = content.split(IMAGE_SLOT)
            for j, part in enumerate(parts):
                if part:
                    segments.append(Segment(part))
                if j < len(parts) - 1:
                    segments.append(Segment(image_slot_text(num_image_tokens), image=True))
            segments.append(Segment(SEP))
        elif role == "assistant":
            segments.append(Segment(ASSISTANT_ROLE + ":"))
            segments.append(Segment(" " + content.strip() + EOS_TOKEN, loss=True))
        else:
            raise ValueError(f"conversation turn {i}: role must be 'user' or 'assistant', got {role!r}")
    if add_generation_prompt:
        segments.append(Segment(ASSISTANT_ROLE + ":"))
    return segments


def gen_prompt(caption: str) -> str:
    """Prompt text for text-to-image generation; the VQ codes follow its last token (BOI)."""
    return USER_ROLE + ": " + caption.strip() + SEP + ASSISTANT_ROLE + ":" + BOI_TOKEN
