# syntax=docker/dockerfile:1
# sloth-serve for one NVIDIA GPU.
#
#   docker build -t sloth-serve .
#   docker run --gpus all -v "$PWD/model:/model:ro" -p 8000:8000 sloth-serve --model /model
#
# Arguments after the image name replace CMD (default: --model /model) and are appended to the
# ENTRYPOINT (sloth-serve --host 0.0.0.0 --port 8000), e.g.
#   ... sloth-serve --model /model --lora sql=/adapters/sql --api-key "$KEY"
#
# Versions: the ARG defaults below are versions.env's (TORCH_CUDA_VERSION, UNSLOTH_VERSION; transformers
# comes pinned by the lock), and tests/unit/test_packaging.py fails when they drift apart.
#
# CUDA: torch is PyPI's default wheel for Linux x86_64, torch 2.11.0, built for CUDA 13.0 (the
# H200 image we test on runs the same torch 2.11+cu130). It brings its own CUDA user-space
# libraries (cuBLAS, cuDNN, NCCL, nvrtc... as nvidia-* wheels), so the base image only has to match
# its CUDA major and let the NVIDIA container runtime check the host driver (NVIDIA_REQUIRE_CUDA,
# driver >= 580 for 13.0): the `base` flavour of nvidia/cuda does that; `runtime` would add a second
# copy of cuBLAS and friends (~3 GB) that torch never loads. Changing TORCH_VERSION means changing
# CUDA_IMAGE to the wheel's CUDA major and regenerating deploy/docker/requirements.lock.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# ---- build: a virtual environment with torch, the locked dependencies, Unsloth and sloth-serve ----
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.11.0
ARG UNSLOTH_VERSION=2026.10.9
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# Third-party packages first: this layer (several GB) survives edits to the source.
# requirements.lock pins every package (deploy/docker/lock.py writes it), Unsloth's bounds included:
# Unsloth goes in with --no-deps, as in the Makefile, so pip would not see them otherwise.
# Then trim: Unsloth's wheel carries a web UI (studio/) that a server never imports, and
# bitsandbytes one library per CUDA/ROCm release while torch here is CUDA 13.0.
COPY deploy/docker/requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" -r /tmp/requirements.lock \
 && pip install --no-cache-dir --no-deps "unsloth==${UNSLOTH_VERSION}" "unsloth_zoo==${UNSLOTH_VERSION}" \
 && site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && rm -rf "$site/studio" \
 && find "$site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete

# The project itself: no dependency resolution here, the lock above installed them all (the
# locked setuptools and wheel build it, so nothing unpinned is fetched).
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY server ./server
COPY kernels ./kernels
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && sloth-serve --version

# ---- runtime ----
FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="sloth-serve" \
      org.opencontainers.image.description="OpenAI-compatible server for Unsloth 4-bit models with LoRA adapters" \
      org.opencontainers.image.licenses="Apache-2.0"
# python3: the interpreter the venv was made with (same base image, so the same /usr/bin/python3.12).
# gcc, libc6-dev, libpython3.12-dev: Triton compiles a small C launcher (with Python.h) the first
# time each kernel signature runs, at run time (triton/runtime/build.py); without a C compiler and
# the headers the first Triton kernel fails. They are the only build tools in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 gcc libc6-dev libpython3.12-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sloth \
 && useradd --uid 10001 --gid sloth --create-home --home-dir /home/sloth --shell /usr/sbin/nologin sloth \
 && mkdir -p /model /adapters /cache \
 && chown sloth:sloth /cache

COPY --from=build /opt/venv /opt/venv

# Nothing is downloaded at run time: weights come from /model (and LoRA adapters from /adapters),
# every cache (Hugging Face, Triton, TorchInductor, Unsloth's generated code) lives in /cache.
# Mount a volume there: the kernels compiled at the first start are read back at the next ones
# (sloth-serve keeps these variables; --compile-cache-dir would move them all). To fill it before the
# first real start, run once with the serving flags plus --precompile-only (it needs the GPU, so not
# at `docker build`):
#   docker run --gpus all -v sloth-cache:/cache -v "$PWD/model:/model:ro" sloth-serve --model /model --precompile-only
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    XDG_CACHE_HOME=/cache \
    TRITON_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    UNSLOTH_COMPILE_LOCATION=/cache/unsloth_compiled_cache \
    UNSLOTH_DISABLE_STATISTICS=1

VOLUME ["/model", "/adapters", "/cache"]
# Numeric, so that Kubernetes runAsNonRoot can check it without a passwd lookup.
USER 10001:10001
WORKDIR /home/sloth
EXPOSE 8000

# /health is 200 once the model is loaded, 503 while loading, draining or after an engine failure.
# The start period covers loading a large checkpoint; set SLOTH_HEALTH_URL if you change --port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r; sys.exit(0 if r.urlopen(os.environ.get('SLOTH_HEALTH_URL', 'http://127.0.0.1:8000/health'), timeout=4).status == 200 else 1)"]

# SIGTERM (docker stop, Kubernetes) makes sloth-serve stop admitting requests and drain the running
# ones for up to --shutdown-timeout seconds: give `docker stop -t` / stop_grace_period more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sloth-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/model"]
