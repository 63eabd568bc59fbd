#!/usr/bin/env bash
# Fill .gpu-check/ (ignored by git, carried to the GPU machine) with what bench/gpu_check.sh
# needs there and cannot get: the wheels the GPU image lacks, the real OLMoE routing log and
# the llama.cpp-quantized test fixture of the device tests. Run in the checkout that the device
# tool sends, with its venv active (the fixture is built by the test helpers, llama-cpp-python).
#
#   bash bench/gpu_check_prepare.sh [SHARED_DIR]      (default: ../shared beside the checkout)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
shared=${1:-$repo/../shared}
dest=.gpu-check

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >> "$exclude"

rm -rf "$dest"
mkdir -p "$dest/wheels" "$dest/fixtures/qwen2moe"
cp "$shared"/gpu-wheels/*.whl "$dest/wheels/"
cp "$shared"/data/routing/olmoe-1b-7b-0924_layer0.jsonl "$dest/"
build_log=$(mktemp)
fixture=$(python -c "from tests.fixtures.models import get_fixture; print(get_fixture('qwen2moe', 'Q4_K_M').gguf_path)" \
          2> "$build_log") || { tail -20 "$build_log"; exit 1; }
cp "$fixture" "$dest/fixtures/qwen2moe/Q4_K_M.gguf"
rm -f "$build_log"
du -sh "$dest"
git status --short --ignored "$dest" | head -1
