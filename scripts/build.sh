#!/usr/bin/env bash
# Sets up the machine and builds llmq into build/ (Release; CUDA backend when nvcc is found).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
cmake -S "$root" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLMQ_CUDA="${LLMQ_CUDA:-AUTO}" >/dev/null
cmake --build "$root/build" -j "$(nproc)"
