#!/usr/bin/env bash
# Runs kernels/cuda/w8a16_gemm.cu's kernel on the CPU: every CUDA thread a std::thread, warp
# collectives (mma.sync m16n8k16, with the PTX ISA's fragment layouts) and __syncthreads as
# barriers, cp.async copies landing at issue or at the latest legal wait, shared memory poisoned;
# the outputs are compared with a float64 reference. A development check of the kernel's indexing,
# pipeline and split-K logic on machines without a GPU (it says nothing about speed, nor about
# the hardware's own rounding). Needs g++ with C++20 and the CUDA headers. ~10 s on 2 cores.
#   bash scripts/w8a16-emulate/run.sh [quick]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/gen/kernels/cuda"
python3 "$here/gen.py" "$root" "$work/gen"
cuda=${CUDA_HOME:-/usr/local/cuda}
g++ -std=c++20 -O1 -ffp-contract=off -Wno-attributes -Wno-unknown-pragmas -DFMT_HEADER_ONLY=1 -I"$cuda/include" \
  -I"$root" -I"$root/include" -I"$here" -I"$work" "$here/main.cpp" "$root/engine/dtype.cpp" -o "$work/emu" -pthread
"$work/emu" "$@"
