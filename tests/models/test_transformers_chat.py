"""transformers' standard recipe on our exports feeds a model exactly the prompt it was trained on.

The recipe (`JanusProcessor.from_pretrained`, `apply_chat_template(..., add_generation_prompt=True)`,
`processor(text=..., images=...)`, `JanusForConditionalGeneration.generate`) against our own
(`python -m janus_train.chat`'s `inference.understand` and `inference.t2i`, which build prompts as
training builds documents): the same input ids, for und chat with an image (DeepSeek's default
system prompt first, as training puts it) and for the image generation prompt, and on a trained
tiny export the same greedy answer and the same greedy image codes. docs/model.md's
"Using an export with transformers" is the recipe run here.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from janus_train.checkpoint.io import load_pretrained, load_tokenizer, read_config
from janus_train.inference import t2i
from janus_train.inference.understand import answer, prompt_ids

QUESTION = "What color is the circle?"
CAPTION = "a red circle"


def _image() -> Image.Image:
    img = Image.new("RGB", (96, 96), (255, 255, 255))
    for x in range(30, 66):
        for y in range(30, 66):
            if (x - 48) ** 2 + (y - 48) ** 2 < 18**2:
                img.putpixel((x, y), (220, 30, 30))
    return img


def _chat_inputs(ckpt, image: Image.Image):
    """docs/model.md's chat recipe: the processor's inputs for QUESTION about `image`."""
    from transformers import JanusProcessor

    processor = JanusProcessor.from_pretrained(str(ckpt))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor, processor(text=prompt, images=image, return_tensors="pt")


def _gen_inputs(ckpt):
    """docs/model.md's image generation recipe: the processor's inputs for CAPTION."""
    from transformers import JanusProcessor

    processor = JanusProcessor.from_pretrained(str(ckpt))
    messages = [{"role": "user", "content": [{"type": "text", "text": CAPTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=prompt, generation_mode="image", return_tensors="pt")


def _check_same_prompts(ckpt) -> None:
    cfg, tok = read_config(ckpt), load_tokenizer(ckpt)
    _, inputs = _chat_inputs(ckpt, _image())
    assert inputs["input_ids"][0].tolist() == prompt_ids(tok, cfg.num_image_tokens, QUESTION)
    assert _gen_inputs(ckpt)["input_ids"][0].tolist() == t2i.prompt_ids(tok, CAPTION)
    # The config and generation config carry the tokenizer's ids, not Llama's defaults.
    text_cfg = json.loads((ckpt / "config.json").read_text())["text_config"]
    gen_cfg = json.loads((ckpt / "generation_config.json").read_text())
    want = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    assert {k: text_cfg[k] for k in want} == want
    assert {k: gen_cfg[k] for k in want} == want
    assert gen_cfg["generation_kwargs"]["boi_token_id"] == tok.convert_tokens_to_ids("<begin_of_image>")


def test_tiny_checkpoint_gets_the_training_prompt(tiny_hf_ckpt):
    _check_same_prompts(tiny_hf_ckpt)


def test_release_converted_to_hf_gets_the_training_prompt(tiny_deepseek_ckpt, tmp_path):
    """A release (whose tokenizer has no chat template for this format) converted to hf."""
    from janus_train.convert import convert

    src = tmp_path / "release"
    import shutil

    shutil.copytree(tiny_deepseek_ckpt, src)
    # DeepSeek's release ships VLChatProcessor files and no chat template of ours.
    for name in ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json", "generation_config.json"):
        (src / name).unlink(missing_ok=True)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    out = convert(src, "deepseek", tmp_path / "hf", "hf")
    _check_same_prompts(out)


# ---- a trained export ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_export(shapes_root, tmp_path_factory, trainer_tools):
    """The tiny model trained briefly on the shapes world (stage 2 alone), exported to hf by
    `convert --src-format train`, so that greedy answers are not a random model's."""
    from janus_train.convert import convert

    run_dir = tmp_path_factory.mktemp("chat_run")
    overrides = trainer_tools.base(shapes_root, run_dir, steps=(1, 100, 1)) + [
        "train.stages.stage1.enabled=false",
        "train.stages.stage3.enabled=false",
        "train.stages.stage2.ratio=4:1:1",
        "checkpoint.every_steps=100",
    ]
    trainer_tools.checked(overrides, timeout=900)
    return convert(run_dir, "train", tmp_path_factory.mktemp("chat_export") / "hf", "hf")


@pytest.mark.slow
def test_trained_export_same_prompt_and_greedy_answer(trained_export):
    from transformers import JanusForConditionalGeneration

    _check_same_prompts(trained_export)
    image = _image()
    processor, inputs = _chat_inputs(trained_export, image)
    model = JanusForConditionalGeneration.from_pretrained(str(trained_export)).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    ours_model = load_pretrained(trained_export).eval()
    tok = load_tokenizer(trained_export)
    text, ours = answer(ours_model, tok, image, QUESTION, max_new_tokens=12)
    if tok.eos_token_id in theirs:  # ours stops before EOS; transformers keeps it (and pads after)
        theirs = theirs[: theirs.index(tok.eos_token_id)]
    assert text and ours, "the trained model answers nothing"
    assert theirs == ours, (processor.decode(theirs), text)
    assert processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == text


@pytest.mark.slow
def test_trained_export_same_greedy_image_codes(trained_export):
    from transformers import JanusForConditionalGeneration

    inputs = _gen_inputs(trained_export)
    model = JanusForConditionalGeneration.from_pretrained(str(trained_export)).eval()
    with torch.no_grad():
        theirs = model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=5.0)
    ours = t2i.generate_codes(load_pretrained(trained_export).eval(), load_tokenizer(trained_export), CAPTION,
                              sample=t2i.SampleConfig(cfg_weight=5.0, greedy=True))
    assert theirs.shape == ours.shape
    assert torch.equal(theirs.cpu(), ours.cpu())
    # The snippet's last steps: codes -> pixels -> a PIL image at the VQ's output size.
    from transformers import JanusProcessor

    processor = JanusProcessor.from_pretrained(str(trained_export))
    pixels = model.decode_image_tokens(theirs)  # [N, H, W, 3]; the PIL image processor takes channels first
    images = processor.postprocess(list(pixels.float().permute(0, 3, 1, 2)), return_tensors="PIL.Image.Image")["pixel_values"]
    assert isinstance(images[0], Image.Image) and images[0].size == (pixels.shape[2], pixels.shape[1])
