#!/usr/bin/env bash
# The whole GPU check in one call, for a lent CUDA device (never run yet: no device so far).
#
#   bash bench/gpu_check.sh [tests|kernels|offload|all]     (default: all; ~10 minutes)
#
# tests:   the CUDA tests (copy stream ordering, pinned store, hybrid policies on the device)
#          and the kernel tests with compiled Triton instead of the interpreter;
# kernels: python -m bench.kernels --quick (correctness + GB/s table of every Triton kernel);
# offload: a synthetic OLMoE-1B-7B Q4_K_M, then decode tok/s under a 1 GiB budget for the
#          copy / cpu / auto miss policies, with the real OLMoE routing log replayed.
# Logs go to $OUT (the device tool's output folder) or /tmp/gpu-check. The device image has
# torch and Triton but not gguf: carry it (and its missing needs) as wheels in .whl/.
set -euo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
phase=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"

if [[ $phase == tests || $phase == all ]]; then
    python3 -m pytest -q -rs -x tests/kernels tests/offload tests/engine/test_hybrid_engine.py \
        tests/engine/test_triton_engine.py 2>&1 | tee "$out/tests.log"
fi
if [[ $phase == kernels || $phase == all ]]; then
    python3 -m bench.kernels --quick 2>&1 | tee "$out/kernels.txt"
fi
if [[ $phase == offload || $phase == all ]]; then
    model=/tmp/olmoe-1b-7b-Q4_K_M.gguf
    [[ -f $model ]] || python3 -m server.cli synth --arch olmoe --preset olmoe-1b-7b --quant Q4_K_M -o "$model"
    log=${ROUTING_LOG:-../shared/data/routing/olmoe-1b-7b-0924_layer0.jsonl}
    replay=(--replay-routing "$log")
    if [[ ! -f $log ]]; then
        echo "no routing log at $log (set ROUTING_LOG): the synthetic router's locality is unrealistic" >&2
        replay=()
    fi
    python3 -m bench.offload_sweep --model "$model" --budgets 1GiB --policies copy,cpu,auto \
        --prompt-tokens 64 --gen-tokens 32 --repeat 3 "${replay[@]}" 2>&1 | tee "$out/offload.txt"
fi
