#!/usr/bin/env bash
# The GPU check: build the CUDA backend, run the gpu tests, benchmark bf16 / int8wo / fp8 on a
# Llama-2-7B-shaped synthetic model next to PyTorch on the same GPU, and print a table last.
#
# The GPU machine has no package registry and no Debian GoogleTest or fmt, so the build is made
# here, on a development machine, and taken along (it is self-contained: static CUDA runtime,
# GoogleTest and fmt; cuBLASLt is opened at run time from the machine's CUDA 13):
#
#   bash scripts/gpu-check.sh prepare      # here: builds build-gpu/, fills .gpu-carry/ (52 MB of the
#                                          # 64 MiB the device tool carries: 3 binaries, each with the kernels)
#   bash scripts/gpu-check.sh run          # there, from the repository root, with .gpu-carry
#   bash scripts/gpu-check.sh local        # both, on one machine that has a GPU and the packages
#   bash scripts/gpu-check.sh sweep        # there: llmq-sweep (16-bit / int8wo / fp8 trade-offs) on the
#                                          # Llama-2-7B and Llama-3-8B shapes; CSV, JSON, gnuplot script
#
# Options for run/local: --quick (fewer benchmark steps). Results also go to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
carry=$root/.gpu-carry
mode=${1:-}
shift || true
quick=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    *) echo "gpu-check: unknown option $arg" >&2; exit 2 ;;
  esac
done

prepare() {
  local shared=${LLMQ_SHARED_DIR:-$root/../shared}
  cmake -S "$root" -B "$root/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLMQ_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="80;90a" -DLLMQ_SHARED_DIR="$shared" >/dev/null
  cmake --build "$root/build-gpu" --target llmq_gpu_tests llmq-step-bench llmq-synth llmq-sweep
  rm -rf "$carry"
  mkdir -p "$carry/bin" "$carry/shared/models" "$carry/shared/data"
  cp "$root"/build-gpu/bin/{llmq_gpu_tests,llmq-step-bench,llmq-synth,llmq-sweep} "$carry/bin/"
  strip "$carry"/bin/*  # host symbols only; keeps the carried folder small
  cp -r "$shared/models/stories260K" "$carry/shared/models/"
  chmod -R u+w "$carry"
  du -sh "$carry"
}

run() {
  local out=${OUT:-/tmp/llmq-gpu-check}
  mkdir -p "$out"
  [ -x "$carry/bin/llmq_gpu_tests" ] || { echo "gpu-check: no $carry/bin; run 'gpu-check.sh prepare' first" >&2; exit 2; }
  local start=$SECONDS status=0
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true

  # NCCL for the tensor-parallel gpu tests: the system's, else the one PyTorch's wheels ship.
  if [ -z "${LLMQ_NCCL_LIBRARY:-}" ] && ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2 &&
     [ ! -e /usr/local/cuda/lib/libnccl.so.2 ] && [ ! -e /usr/local/cuda/lib64/libnccl.so.2 ]; then
    local nccl
    nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
    if [ -n "$nccl" ] && [ -e "$nccl" ]; then export LLMQ_NCCL_LIBRARY=$nccl; fi
  fi

  echo "== 1. gpu tests"
  LLMQ_SHARED_DIR=$carry/shared timeout 240 "$carry/bin/llmq_gpu_tests" --gtest_brief=1 2>&1 | tee "$out/gpu_tests.log" || status=1
  echo "   ($((SECONDS - start)) s so far)"

  echo "== 2. Llama-2-7B-shaped synthetic model"
  local model=/dev/shm/llmq-llama2-7b
  [ -d /dev/shm ] && [ "$(df --output=avail -B1G /dev/shm | tail -1)" -gt 20 ] || model=/tmp/llmq-llama2-7b
  [ -f "$model/model.safetensors" ] || "$carry/bin/llmq-synth" --out "$model" --shape llama2-7b >/dev/null
  echo "   written to $model ($((SECONDS - start)) s so far)"

  echo "== 3. llmq step benchmark"
  local steps=32
  [ $quick = 1 ] && steps=8
  timeout 240 "$carry/bin/llmq-step-bench" --model "$model" --backend cuda --quant none,int8wo,fp8 --batches 1,16,64 \
    --prompt-len 128 --decode-steps $steps --prefill 2048 --json "$out/llmq_bench.json" >/dev/null || status=1
  echo "   ($((SECONDS - start)) s so far)"

  echo "== 3b. where the time goes (LLMQ_PROFILE=1: GPU time per op, GEMM plans, W8A16 choices)"
  LLMQ_PROFILE=1 timeout 120 "$carry/bin/llmq-step-bench" --model "$model" --backend cuda --quant none,int8wo,fp8 --batches 1,16,64 \
    --prompt-len 128 --decode-steps 4 --prefill 2048 >/dev/null 2>"$out/profile.log" || status=1
  # Each kind of step's 8 costliest ops (the whole table is in profile.log).
  awk '/^llmq profile/ {p = 1; print; next} /^llmq / {p = 0} p && /^  [^ ]/ {n = 0; print; next}
       p && /^    / && ++n <= 8 {print}' "$out/profile.log" || true
  # The timed choices of the 8-bit linears (us per path, "wrong" for a path left out) at every row count.
  grep -E "^  (I8|F8_E4M3) x " "$out/profile.log" || true
  echo "   ($((SECONDS - start)) s so far)"

  # The FP8 wgmma kernel and the INT8 one's copier form are not in the timed choice
  # (kFp8WgmmaInTimedChoice in kernels/cuda/cuda_backend.cu: slower than cuBLASLt on an H200).
  # This pass times them against the other paths (LLMQ_LINEAR_PATH=all): the choice lines of the
  # prefill shapes and of 64-row decode, then the same prefill with them forced (LLMQ_LINEAR_PATH=wgmma).
  # The step times first: what the table would say with the wgmma kernels in the timed choice.
  echo "== 3c. int8wo and fp8 prefill with the wgmma kernels timed against the others, then forced"
  LLMQ_LINEAR_PATH=all LLMQ_PROFILE=1 timeout 90 "$carry/bin/llmq-step-bench" --model "$model" --backend cuda \
    --quant int8wo,fp8 --batches 1,64 --prompt-len 128 --decode-steps 4 --prefill 2048 2>"$out/wgmma_profile.log" \
    >/dev/null || status=1
  grep -E "^[a-z0-9]+: (prefill|decode)" "$out/wgmma_profile.log" || true
  grep -E "M<=(64|2048) " "$out/wgmma_profile.log" || true
  LLMQ_LINEAR_PATH=wgmma timeout 90 "$carry/bin/llmq-step-bench" --model "$model" --backend cuda \
    --quant int8wo,fp8 --batches 1 --prompt-len 128 --decode-steps 4 --prefill 2048 2>&1 | tee "$out/wgmma_forced.txt" |
    grep -E "^[a-z0-9]+: prefill" || status=1
  echo "   ($((SECONDS - start)) s so far)"

  # A path whose output disagreed with cuBLASLt's (or the GEMV's) when first timed was left out of
  # the choice, with a warning: a kernel wrong on this GPU.
  if grep -h "disagrees with" "$out/profile.log" "$out/wgmma_profile.log" 2>/dev/null | sort -u | grep .; then
    echo "   paths left out: wrong on this GPU"
    status=1
  fi

  echo "== 4. PyTorch peer"
  local reps=10
  [ $quick = 1 ] && reps=3
  PYTHONUNBUFFERED=1 python3 scripts/torch_peer.py --context 144 --reps $reps --json "$out/torch_peer.json" >/dev/null || status=1
  echo "   ($((SECONDS - start)) s so far)"

  echo "== 5. table"
  python3 scripts/gpu_report.py "$out/llmq_bench.json" "$out/torch_peer.json" | tee "$out/table.md" || status=1
  echo "gpu-check: $((SECONDS - start)) s, status $status"
  return $status
}

# The quantization trade-off sweeps (issue 8's GPU half). The memory budgets give the 16-bit model
# room for about 30 (Llama-2-7B) and 80 (Llama-3-8B) sequences of 128 + 32 tokens; MFU is against
# the H100/H200 dense BF16 peak (989 TFLOPS) for every mode. Draw the PNGs afterwards, anywhere:
# cd DIR && gnuplot sweep.gnuplot
sweep() {
  local out=${OUT:-/tmp/llmq-gpu-check}
  [ -x "$carry/bin/llmq-sweep" ] || { echo "gpu-check: no $carry/bin/llmq-sweep; run 'gpu-check.sh prepare' first" >&2; exit 2; }
  local start=$SECONDS status=0 dir=/dev/shm
  [ -d /dev/shm ] && [ "$(df --output=avail -B1G /dev/shm | tail -1)" -gt 40 ] || dir=/tmp
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  for shape in llama2-7b:16384 llama3-8b:17000; do
    local name=${shape%%:*} budget=${shape##*:}
    local model=$dir/llmq-$name
    [ -f "$model/config.json" ] || "$carry/bin/llmq-synth" --out "$model" --shape "$name" >/dev/null
    echo "== sweep $name (budget $budget MiB; $((SECONDS - start)) s so far)"
    timeout 300 "$carry/bin/llmq-sweep" --model "$model" --backend cuda --out "$out/sweep-$name" --input-len 128 \
      --output-len 32 --batches 1,2,4,8,16,32,64,128 --memory-budget-mib "$budget" --peak-tflops 989 \
      --no-plot | tee "$out/sweep-$name.txt" || status=1
    rm -rf "$model"
  done
  echo "gpu-check sweep: $((SECONDS - start)) s, status $status"
  return $status
}

case $mode in
  prepare) prepare ;;
  sweep) sweep ;;
  run) run ;;
  local) prepare && run ;;
  *) echo "usage: gpu-check.sh prepare|run|local|sweep [--quick]" >&2; exit 2 ;;
esac
