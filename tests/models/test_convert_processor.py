"""Converting DeepSeek's release to hf writes transformers' Janus processor files (issue 14):
`AutoImageProcessor` and `JanusProcessor` load the result, and the image processor's pixels are
our und preprocessing's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from janus_train.checkpoint.io import read_config
from janus_train.contracts.preprocess import und_pixels
from janus_train.convert import convert

# The processor files of DeepSeek's Janus-Pro release (deepseek-ai/Janus-Pro-7B), image_size set
# to the tiny model's; the release names its own classes, which transformers does not know.
RELEASE_PREPROCESSOR = {
    "background_color": [127, 127, 127],
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "VLMImageProcessor",
    "image_size": None,  # the model's
    "image_std": [0.5, 0.5, 0.5],
    "min_size": 14,
    "processor_class": "VLChatProcessor",
    "rescale_factor": 0.00392156862745098,
}
RELEASE_PROCESSOR = {
    "add_special_token": False,
    "ignore_id": -100,
    "image_tag": "<image_placeholder>",
    "mask_prompt": True,
    "num_image_tokens": None,  # the model's
    "processor_class": "VLChatProcessor",
    "sft_format": "deepseek",
}
RELEASE_TOKENIZER_CONFIG = {
    "bos_token": "<｜begin▁of▁sentence｜>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "<｜end▁of▁sentence｜>",
    "model_max_length": 16384,
    "pad_token": None,
    "tokenizer_class": "LlamaTokenizerFast",
    "unk_token": None,
    "use_default_system_prompt": True,
}


@pytest.fixture(scope="module")
def release_like(tiny_deepseek_ckpt, tmp_path_factory):
    """The tiny DeepSeek-layout checkpoint with the release's processor and tokenizer configs."""
    out = tmp_path_factory.mktemp("release") / "janus_pro_tiny"
    shutil.copytree(tiny_deepseek_ckpt, out)
    cfg = read_config(out, "deepseek")
    for name in ("processor_config.json", "chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    pre = {**RELEASE_PREPROCESSOR, "image_size": cfg.vision.image_size}
    proc = {**RELEASE_PROCESSOR, "num_image_tokens": cfg.num_image_tokens}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(RELEASE_TOKENIZER_CONFIG, indent=2))
    return out


@pytest.fixture(scope="module")
def converted(release_like, tmp_path_factory):
    return convert(release_like, "deepseek", tmp_path_factory.mktemp("hf") / "hf", "hf")


def test_release_processor_is_not_loadable_as_is(release_like):
    """The defect the conversion fixes: transformers cannot load the release's files."""
    from transformers import AutoImageProcessor

    with pytest.raises(ValueError, match="Unrecognized image processor"):
        AutoImageProcessor.from_pretrained(str(release_like))


def _test_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((37, 91), (120, 50), (64, 64), (9, 200))]


def test_hf_export_has_transformers_processor(converted, release_like):
    from transformers import AutoImageProcessor, JanusProcessor

    cfg = read_config(converted, "hf")
    size = cfg.vision.image_size
    image_processor = AutoImageProcessor.from_pretrained(str(converted))
    assert type(image_processor).__name__.startswith("JanusImageProcessor")
    processor = JanusProcessor.from_pretrained(str(converted))
    assert processor.num_image_tokens == cfg.num_image_tokens
    assert processor.use_default_system_prompt
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == cfg.image_token_id
    for proc in (image_processor, processor.image_processor):
        assert dict(proc.size) == {"height": size, "width": size} or proc.size.height == proc.size.width == size
        assert list(proc.image_mean) == [0.5] * 3 and list(proc.image_std) == [0.5] * 3
        assert proc.min_size == 14 and int(proc.resample) == int(Image.BICUBIC)
    for img in _test_images():
        ours = und_pixels(img, size)
        for proc in (image_processor, processor.image_processor):
            theirs = proc(images=img, return_tensors="pt")["pixel_values"][0]
            assert theirs.shape == ours.shape
            torch.testing.assert_close(theirs.to(torch.float32), ours, atol=1e-6, rtol=0)
    # The processor expands one image into the model's placeholder count.
    ids = processor(text=["<image_placeholder> what is this?"], images=[_test_images()[0]], return_tensors="pt")["input_ids"][0]
    assert int((ids == cfg.image_token_id).sum()) == cfg.num_image_tokens
    # DeepSeek's own classes are gone from the hf checkpoint.
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = converted / name
        if path.is_file():
            assert "VLChatProcessor" not in path.read_text() and "VLMImageProcessor" not in path.read_text(), name


def test_release_through_native_to_hf(release_like, tmp_path):
    """native keeps the release's files; hf made from that native checkpoint still gets transformers'."""
    from transformers import JanusProcessor

    native = convert(release_like, "deepseek", tmp_path / "native", "native")
    assert json.loads((native / "preprocessor_config.json").read_text())["image_processor_type"] == "VLMImageProcessor"
    hf = convert(native, "native", tmp_path / "hf", "hf")
    assert JanusProcessor.from_pretrained(str(hf)).image_processor.size.height == read_config(hf).vision.image_size


def test_image_size_mismatch_is_refused(release_like, tmp_path):
    from janus_train.checkpoint.io import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(release_like, bad)
    pre = json.loads((bad / "preprocessor_config.json").read_text())
    pre["image_size"] = 999
    (bad / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match="image_size=999"):
        convert(bad, "deepseek", tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()
