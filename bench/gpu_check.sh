#!/usr/bin/env bash
# The whole GPU check in one call of at most 8 minutes, on a bare GPU machine without network
# (torch 2.11 + CUDA 13, Triton 3.6, numpy, transformers, tokenizers, jinja2, tqdm, psutil,
# prometheus-client, pytest, httpx there; moestream not installed).
#
#   bash bench/gpu_check.sh [--out DIR] [--phases smoke,tests,kernels,offload]
#   bash bench/gpu_check.sh --cpu        # rehearsal of every phase on a machine without a GPU
#
# Preparation, once, on the machine that sends the checkout, in its root with its venv active
# (llama-cpp-python builds the quantized fixture):
#
#   . .venv/bin/activate && bash bench/gpu_check_prepare.sh
#
# It fills the ignored folder .gpu-check/ (listed in .git/info/exclude): the wheels of
# ../shared/gpu-wheels (gguf, fastapi, starlette, pydantic, pydantic-core, uvicorn, ...: what
# the GPU image lacks), the OLMoE routing log of ../shared/data/routing (../shared does not
# travel) and the quantized test fixtures made here by llama.cpp (no llama-cpp-python there).
# Then the device tool's call:
#
#   run(command="bash bench/gpu_check.sh", carry=[".gpu-check"], timeout_s=540)
#
# Results: gpu_check.json (one entry per phase: status, seconds, key figures) and gpu_check.md
# in --out (default $OUT, else /tmp/gpu-check), each phase's output in <phase>.log beside them.
# Phases (bench/gpu_check.py): smoke, tests, kernels, offload, each with its own time limit and
# status; a failed phase never stops the next. Exit status 0 when every phase is ok.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
py=${PYTHON:-python3}
cpu=0
for arg in "$@"; do [[ $arg == --cpu ]] && cpu=1; done

work=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
# moestream.* from the source tree without installing: a namespace folder whose layers are
# links to the repo's folders (as pyproject's package-dir maps them).
mkdir -p "$work/src/moestream"
for layer in kernels offload engine tools server; do ln -s "$repo/$layer" "$work/src/moestream/$layer"; done
site=""
if ((!cpu)) && compgen -G ".gpu-check/wheels/*.whl" > /dev/null; then  # cp312 wheels for the GPU image
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
            .gpu-check/wheels/*.whl; then
        site="$work/site:"
    else
        echo "gpu_check: installing .gpu-check/wheels failed; phases needing them will fail" >&2
    fi
fi
# (bench.* and tests.* come from the working directory, the repo root: python -m and pytest)
export PYTHONPATH="$work/src:$site${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
if ((cpu)); then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
"$py" bench/gpu_check.py --work "$work" "$@"
