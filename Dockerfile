# syntax=docker/dockerfile:1
# The lloco image: CUDA + cuDNN runtime, Python 3.11, Ray and the lloco package with its `gpu` extra
# (flash-attn), run as the non-root user 1000. Every Ray pod of the Helm chart (head, workers, job
# clusters) and its `helm test` pod run this image.
#
#   docker build -t REGISTRY/lloco:0.1.0 .
#
# torch comes from the PyTorch index built for the CUDA version of the base image; flash-attn is built
# (or its matching prebuilt wheel fetched) against that torch in the devel stage, and only the finished
# environment is copied into the runtime stage. Keep CUDA_VERSION and TORCH_INDEX_URL in step.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu22.04
ARG UV_VERSION=0.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-${UBUNTU} AS build
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Ampere (A10G, A100; sm80 code also runs on sm86) and Hopper (H100, H200).
ARG FLASH_ATTN_CUDA_ARCHS=80;90
ARG MAX_JOBS=8
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/lloco \
    PATH=/opt/lloco/bin:$PATH
RUN uv python install ${PYTHON_VERSION} \
    && uv venv --python ${PYTHON_VERSION} /opt/lloco \
    && uv pip install "torch==${TORCH_VERSION}" --index-url ${TORCH_INDEX_URL} \
    && uv pip install packaging ninja psutil setuptools wheel
WORKDIR /src
# README is package metadata only; the wildcard keeps the build working in a checkout without it.
COPY pyproject.toml README* NOTICE ./
COPY platform/ platform/
# First the package and its dependencies (torch stays the CUDA build above), then the `gpu` extra
# without build isolation, since flash-attn compiles against the installed torch.
RUN uv pip install . \
    && FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}" MAX_JOBS=${MAX_JOBS} \
       uv pip install --no-build-isolation ".[gpu]" \
    && python -c "import flash_attn, grpc_health.v1, lloco, ray, torch; print('lloco', lloco.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-${UBUNTU}
# wget: KubeRay's default health probes; the rest of what Ray needs is in the environment.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 lloco \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash lloco \
    && mkdir -p /cache \
    && chown 1000:1000 /cache
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/lloco /opt/lloco
ENV VIRTUAL_ENV=/opt/lloco \
    PATH=/opt/lloco/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    LLOCO_DATA_DIR=/cache/lloco
USER 1000:1000
WORKDIR /home/lloco
CMD ["lloco", "--help"]
