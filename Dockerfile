# syntax=docker/dockerfile:1
#
# moestream on an NVIDIA GPU:
#   docker build -t moestream .
#   docker run --gpus all -v ~/models:/models -p 8000:8000 moestream \
#       serve --model /models/model.gguf --vram-budget 6GiB
#
# PyTorch's Linux wheels carry their own CUDA runtime libraries, so a plain Python base is
# enough: the host provides the driver through the NVIDIA Container Toolkit. The default torch
# is PyTorch's CUDA 12.8 build: NVIDIA driver 570 or newer (CUDA 12 minor-version
# compatibility may stretch that to 525.60.13; untested), where PyPI's CUDA 13 build needs
# 580 or newer. Other builds: --build-arg TORCH_INDEX_URL=...
#   https://download.pytorch.org/whl/cpu    no GPU: no CUDA libraries, a much smaller image
#   https://pypi.org/simple                 PyPI's default (CUDA 13, driver >= 580)
# (see docs/DEPLOY.md). Every `serve` flag also reads an environment variable (MOESTREAM_*).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with torch and moestream, nothing else -------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/moestream
ENV PATH=/opt/moestream/bin:$PATH
# torch alone first: it is most of the image and changes least, so its layer stays cached.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY offload ./offload
COPY engine ./engine
COPY tools ./tools
COPY server ./server
# ninja: torch.utils.cpp_extension builds the C++ CPU kernels with it at first use.
RUN pip install . ninja

# --- runtime -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Triton compiles a small C launcher for each kernel signature when it first runs on the GPU,
# and the C++ CPU kernels (kernels/cpu) are built at first use for the host CPU
# (-march=native): both need a C/C++ compiler at run time, so the compiler drivers and libc
# headers stay. Nothing else of a build toolchain does (no make, cmake, git, pip cache,
# source tree); those stay in the build stage. Versions are not pinned (DL3008): the base is
# a fixed Debian release, whose point releases only bring fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/moestream /opt/moestream

# The cache folder exists before any volume is mounted on it, so a fresh named volume takes
# its owner (the server's user) instead of root.
RUN useradd --create-home --uid 1000 --user-group moestream \
    && mkdir -p /models /home/moestream/.cache \
    && chown moestream:moestream /models /home/moestream/.cache
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
WORKDIR /home/moestream

# The server binds 127.0.0.1 by default; in a container it must listen on every interface.
# NVIDIA_*: without them `--gpus all` exposes only the `utility` driver capability, not CUDA.
ENV PATH=/opt/moestream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MOESTREAM_HOST=0.0.0.0 \
    MOESTREAM_PORT=8000 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TRITON_CACHE_DIR=/home/moestream/.cache/triton

# Models are mounted here (read-only is fine). Kernel builds, the Triton cache, hf: downloads
# and the --demo model live under /home/moestream/.cache: mount a volume there to keep them.
VOLUME ["/models"]
EXPOSE 8000

# No curl in the image: Python asks /health on the port the server was given through
# MOESTREAM_PORT. 503 (model loading) raises, so the container is healthy once loaded;
# loading a big model can take minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MOESTREAM_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["moestream"]
CMD ["serve"]
