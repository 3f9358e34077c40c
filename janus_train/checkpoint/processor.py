"""transformers' Janus processor files for an hf checkpoint written from DeepSeek's release.

DeepSeek's release ships its own processor files: `preprocessor_config.json` with
`image_processor_type: VLMImageProcessor` and `processor_config.json` for `VLChatProcessor`.
transformers knows neither class, so `AutoImageProcessor` / `JanusProcessor.from_pretrained` fail
on a copy of them. An hf checkpoint gets transformers' files instead, made as transformers' own
conversion script (models/janus/convert_janus_weights_to_hf.py) makes them: a
`JanusImageProcessor` from the release's statistics at the model's und image size, and a
`JanusProcessor` whose tokenizer names the image tokens, saved with `save_pretrained`. Processor
files that already are transformers' (an hf or native checkpoint made from hf) are left as they are.

`CHAT_TEMPLATE` renders a conversation as training does (`contracts/conversation.py`), so that
transformers' chat recipe (`apply_chat_template` + the processor, which puts DeepSeek's default
system prompt first with `use_default_system_prompt`) feeds a model the ids it was trained on.
`token_ids` and `write_generation_config` give an hf config the tokenizer's special ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from janus_train.contracts import conversation as conv
from janus_train.models.janus.config import JanusConfig

PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# The tokenizer attributes JanusProcessor reads (tokenizer.image_token, .boi_token, .eoi_token).
IMAGE_TOKENS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
# Fields of DeepSeek's VLMImageProcessor config that JanusImageProcessor takes under the same name.
_SHARED_FIELDS = ("do_normalize", "image_mean", "image_std", "min_size", "rescale_factor")
# DeepSeek's VLMImageProcessor defaults (SigLIP statistics), for a release without the file.
_RELEASE_DEFAULTS = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "min_size": 14}

# The DeepSeek conversation format as `conversation.render_conversation` writes it (sft format
# "deepseek": role + ": " + message, then "\n\n" after a user turn and EOS after an answer;
# an image part is the placeholder followed by "\n", as training puts "<image>\n" before the
# question), ending with "<|Assistant|>:" for `add_generation_prompt`. `content` is a string or
# a list of {"type": "text"|"image"} parts. The system prompt is not rendered unless a system
# message is given: JanusProcessor prepends DeepSeek's default itself (`use_default_system_prompt`).
# transformers compiles chat templates with trim_blocks and lstrip_blocks, which drop a newline
# written right after a `{% %}` tag; every newline here is an expression (`{{ "\n" }}`) and the
# source has none, so the template renders the same under any jinja whitespace settings.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}"
    "{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}{{ '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}" + conv.USER_ROLE + ": "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}" + conv.IMAGE_TOKEN + "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n\\n' }}"
    "{% else %}" + conv.ASSISTANT_ROLE + ": "
    "{{ (m['content'] if m['content'] is string else m['content'][0]['text']) | trim }}" + conv.EOS_TOKEN +
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + conv.ASSISTANT_ROLE + ":{% endif %}"
)


class ProcessorFilesError(ValueError):
    """The release's processor files cannot be turned into transformers' ones; the message says why."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ProcessorFilesError(f"{path} is not valid JSON: {e}") from None


def has_transformers_processor(ckpt: Path) -> bool:
    """Whether `ckpt` already holds a processor config transformers' Janus classes load."""
    proc = _read_json(ckpt / PROCESSOR_CONFIG)
    pre = _read_json(ckpt / PREPROCESSOR_CONFIG)
    return proc.get("processor_class") == "JanusProcessor" or str(pre.get("image_processor_type", "")).startswith("JanusImageProcessor")


def image_processor_for(cfg: JanusConfig, release: dict | None = None):
    """transformers' `JanusImageProcessor` (PIL backend, which resizes as our und preprocessing
    does) for the model's und image size, with the release's statistics where it gives them."""
    try:  # the PIL backend: the same bicubic as PIL, and it needs no torchvision
        from transformers import JanusImageProcessorPil as JanusImageProcessor
    except ImportError:
        from transformers import JanusImageProcessor
    from transformers.image_utils import PILImageResampling

    release = release or {}
    size = cfg.vision.image_size
    if "image_size" in release and release["image_size"] != size:
        raise ProcessorFilesError(
            f"{PREPROCESSOR_CONFIG} has image_size={release['image_size']} but the model's vision tower takes {size} px images"
        )
    kwargs = {**_RELEASE_DEFAULTS, **{k: release[k] for k in _SHARED_FIELDS if k in release}}
    return JanusImageProcessor(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC, **kwargs)


def write_hf_processor(ckpt: str | Path, cfg: JanusConfig) -> bool:
    """Replace DeepSeek's processor files in `ckpt` (a directory being written) by transformers'
    Janus ones. Returns False (and changes nothing) when the files already are transformers'."""
    ckpt = Path(ckpt)
    if has_transformers_processor(ckpt):
        return False
    release = _read_json(ckpt / PREPROCESSOR_CONFIG)
    image_processor = image_processor_for(cfg, release)
    for name in (PROCESSOR_CONFIG, PREPROCESSOR_CONFIG):
        (ckpt / name).unlink(missing_ok=True)
    if not (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer_config.json").is_file():
        image_processor.save_pretrained(str(ckpt))  # no tokenizer: the image processor alone
        return True
    from transformers import AutoTokenizer, JanusProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt), extra_special_tokens=IMAGE_TOKENS)
    unknown = [t for t in IMAGE_TOKENS.values() if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if unknown:
        raise ProcessorFilesError(f"the tokenizer has no single token for {unknown}; it is not a Janus tokenizer")
    # Our chat format, whatever the release's tokenizer carries (DeepSeek's has none for it):
    # transformers' recipe then feeds the prompt `python -m janus_train.chat` feeds.
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        # DeepSeek's VLChatProcessor puts its system prompt first, as transformers' conversion does.
        use_default_system_prompt=True,
        num_image_tokens=cfg.num_image_tokens,
    )
    processor.save_pretrained(str(ckpt))
    return True


def image_token_id(ckpt: str | Path) -> int | None:
    """The id of `<image_placeholder>` in `ckpt`'s tokenizer (None without one), as transformers'
    conversion takes it: a release's config.json does not name it."""
    ckpt = Path(ckpt)
    if not (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    found = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"])
    return None if found in (None, tokenizer.unk_token_id) else int(found)


def token_ids(ckpt: str | Path) -> dict[str, int]:
    """The special ids of `ckpt`'s tokenizer ({} without one): bos/eos/pad_token_id, and
    boi_token_id (<begin_of_image>) where it has one; an hf config carries these, not
    transformers' Llama defaults."""
    ckpt = Path(ckpt)
    if not (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer_config.json").is_file():
        return {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    boi = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["boi_token"])
    if boi not in (None, tokenizer.unk_token_id):
        ids["boi_token_id"] = boi
    return {k: int(v) for k, v in ids.items() if v is not None}


def write_generation_config(ckpt: str | Path, ids: dict[str, int]) -> None:
    """`generation_config.json` for transformers' `generate`, with the tokenizer's ids: a copied
    one gets them (its other fields are kept), a missing one is written with DeepSeek's image
    generation defaults (CFG weight 5, temperature 1), as transformers' conversion writes it."""
    path = Path(ckpt) / "generation_config.json"
    if not ids:
        return
    found = _read_json(path)
    gen = dict(found) or {"_from_model_config": False, "guidance_scale": 5.0, "temperature": 1.0}
    gen.update({k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids})
    if "boi_token_id" in ids:  # JanusForConditionalGeneration's image mode reads it from generation_kwargs
        gen["boi_token_id"] = ids["boi_token_id"]
        gen["generation_kwargs"] = {**gen.get("generation_kwargs", {}), "boi_token_id": ids["boi_token_id"]}
    if gen != found:  # a file that already says this is kept byte for byte
        path.write_text(json.dumps(gen, indent=2) + "\n")
