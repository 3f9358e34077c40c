"""janus-train: distributed training for Janus-Pro / JanusFlow unified multimodal models."""

from setuptools import find_packages, setup

# torch is deliberately unpinned above its floor: the Makefile installs the CPU build
# (torch==2.13.0) first, and a range it satisfies installs nothing more. Pinning a
# newer torch here would make pip pull a multi-GB CUDA build on CPU machines.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "deepspeed>=0.16,<0.21",
    "megatron-core>=0.12,<0.18",
    "webdataset>=0.2.100,<2",
    "megatron-energon>=7,<8",
    "hydra-core>=1.3,<1.4",
    "pydantic>=2.5,<3",  # the typed config schemas (training/config.py, data/config.py)
    "omegaconf>=2.3,<2.4",
    "wandb>=0.18",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    "pillow>=10",
    "tqdm>=4.66",
    "numpy>=1.26",
    "pyyaml>=6",
    "orjson>=3.9",  # per-sample json in the data loader (formats.parse_json)
    "scipy>=1.10",  # blob labelling of the shapes scorer (eval/shapes.py)
    # build_shards --format parquet: parquet files and `datasets` save_to_disk directories
    # (data_pipelines/input_formats.py). Neither requires torch.
    "pyarrow>=15",
    "datasets>=2.19",
    # JanusFlow: the time embedding of its generation encoder, and AutoencoderKL (SDXL-VAE). No
    # torch requirement of its own, so it never pulls a CUDA build.
    "diffusers>=0.31,<1",
    # finetune.mode=lora: LoRA adapters on our modules, and the adapter directories that
    # PeftModel.from_pretrained loads (requires torch>=1.13, so the pinned CPU torch stays).
    "peft>=0.13,<1",
]

EXTRAS_REQUIRE = {
    # flash-attn compiles against CUDA; it cannot be built on a CPU-only machine.
    "gpu": ["flash-attn>=2.6"],
    # dockerfile: BuildKit's Dockerfile parser, for `make docker-check` without a daemon.
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "dockerfile>=3.3,<4", "matplotlib>=3.7"],
    # plots of evaluation curves (python -m janus_train.tools.plot_eval)
    "plot": ["matplotlib>=3.7"],
}

setup(
    name="janus-train",
    version="0.1.0",
    description="Open distributed training for DeepSeek Janus-Pro / JanusFlow models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["janus_train*", "data_pipelines*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "janus-convert=janus_train.convert:main",
            "janus-generate=janus_train.generate:main",
            "janus-chat=janus_train.chat:main",
        ]
    },
)
