#!/usr/bin/env bash
# Sets up a fresh machine, builds llmq (compiling the CUDA backend when nvcc is found) and runs
# every test; then builds again with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only)
# and runs the tests there too. Tests labelled `gpu` skip cleanly without a GPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
jobs=$(nproc)
bash "$root/scripts/build.sh"
(cd "$root/build" && ctest --output-on-failure -j "$jobs")

cmake -S "$root" -B "$root/build-asan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLLMQ_CUDA=OFF \
  -DLLMQ_SANITIZE=ON >/dev/null
cmake --build "$root/build-asan" -j "$jobs"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd "$root/build-asan" && ctest --output-on-failure -j "$jobs")
