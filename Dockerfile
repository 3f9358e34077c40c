# janus-train image: the project and its dependencies, entry point launch/train.py.
#
#   docker build -t janus-train .                                  # CUDA (default)
#   docker build -t janus-train:cpu --build-arg VARIANT=cpu .      # CPU only, for local runs
#   docker run --rm --gpus all --ipc=host -v /data:/data -v $PWD/runs:/opt/janus-train/runs \
#       janus-train +recipe=janus_pro_1b data.root=/data
#   docker run --rm --gpus all --ipc=host --entrypoint torchrun janus-train \
#       --nproc-per-node 8 launch/train.py +recipe=janus_pro_7b
#
# Build arguments (docs/clusters.md has more):
#   VARIANT        gpu | cpu
#   CUDA_BASE      CUDA *devel* image: DeepSpeed JIT-compiles its CUDA ops at run time and
#                  flash-attn may compile at build time, both need nvcc. Its CUDA major
#                  version must match the torch wheel's (TORCH_INDEX_URL).
#   TORCH_VERSION  kept equal to the Makefile's TORCH_SPEC (tests/cluster/test_docker.py checks)
#   MAX_JOBS       parallel compile jobs for flash-attn (it needs ~4 GB of RAM per job)

ARG VARIANT=gpu
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG CPU_BASE=python:3.12-slim-bookworm

# ---- GPU base: CUDA toolkit, Python 3.12 from Ubuntu 24.04 ------------------------------------
FROM ${CUDA_BASE} AS base-gpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    JANUS_EXTRAS=gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---- CPU base: a slim Python; the CPU torch build, no CUDA anywhere ---------------------------
FROM ${CPU_BASE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    JANUS_EXTRAS=""
# g++: DeepSpeed JIT-compiles its CPU optimizer ops on first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---- the image -------------------------------------------------------------------------------
FROM base-${VARIANT} AS final
ARG TORCH_VERSION=2.13.0
ARG MAX_JOBS=4
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MAX_JOBS=${MAX_JOBS}
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip setuptools wheel packaging ninja psutil
# torch first, from the index that matches the variant, so that no later dependency can pull a
# different build of it (the same rule as the Makefile's CPU install).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/janus-train
# Only what the install and a run need (.dockerignore keeps data, runs and venvs out).
COPY setup.py README.md ./
COPY janus_train/ janus_train/
COPY data_pipelines/ data_pipelines/
COPY launch/ launch/
COPY recipes/ recipes/
# --no-build-isolation: flash-attn's build imports the torch installed above. Editable, so a
# checkout bind-mounted over /opt/janus-train runs its own code. The extras come from the base
# stage: ".[gpu]" for gpu, plain "." for cpu (pip rejects an empty "[]").
RUN pip install --no-cache-dir --no-build-isolation -e ".${JANUS_EXTRAS:+[$JANUS_EXTRAS]}" \
    && python -c "import janus_train, torch, deepspeed; print('torch', torch.__version__)"

ENTRYPOINT ["python", "/opt/janus-train/launch/train.py"]
CMD ["+recipe=tiny_demo"]
