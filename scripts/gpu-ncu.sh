#!/usr/bin/env bash
# Nsight Compute on the GPU machine (its CUDA 13 has ncu): the kernels of a 2-layer
# Llama-2-7B-shaped model, one CSV per case in $OUT (or /tmp/llmq-ncu), for reading here.
#   bash scripts/gpu-ncu.sh [CASE ...]   # needs .gpu-carry (gpu-check.sh prepare); default: every case
# The durations-* cases time every kernel of a decode run instead (see durations below).
# Each case: quant mode, decode batch, kernel name regex, how many launches to profile, the
# linear path forced (LLMQ_LINEAR_PATH, so that the kernel runs whichever path would be faster),
# and the prompt length (1: the prefill has the decode step's rows, so every launch is decode-shaped).
set -uo pipefail
cd "$(dirname "$0")/.."
carry=$PWD/.gpu-carry
out=${OUT:-/tmp/llmq-ncu}
mkdir -p "$out"
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
model=/dev/shm/llmq-ncu-2layer
[ -f "$model/config.json" ] || "$carry/bin/llmq-synth" --out "$model" --shape llama2-7b --layers 2 >/dev/null
wanted=" $* "
profile() {
  local name=$1 quant=$2 batch=$3 regex=$4 count=$5 path=$6 prompt=$7
  [ "$wanted" = "  " ] || [[ $wanted == *" $name "* ]] || return 0
  LLMQ_LINEAR_PATH=$path timeout 120 "$ncu" --target-processes all --clock-control none --kernel-name "regex:$regex" --launch-count "$count" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis -f -o "/tmp/ncu-$name" \
    "$carry/bin/llmq-step-bench" --model "$model" --backend cuda --quant "$quant" --batches "$batch" \
    --prompt-len "$prompt" --decode-steps 2 --prefill 0 >"/tmp/ncu-$name.log" 2>&1 || { tail -5 "/tmp/ncu-$name.log"; return; }
  "$ncu" --import "/tmp/ncu-$name.ncu-rep" --csv --page details >"$out/$name.csv" 2>&1
  "$ncu" --import "/tmp/ncu-$name.ncu-rep" --csv --page raw >"$out/$name.raw.csv" 2>&1  # stall reasons too
  echo "$name: $(grep -c '"Duration"' "$out/$name.csv") launches profiled"
}
# Every kernel's duration (one metric, no replay passes) over a 2-layer decode run, beside the
# bench's own step time from a plain run: whether a decode step is its kernels or the gaps between
# them. Prints each kernel's launches and mean duration, and the totals.
durations() {
  local name=$1 quant=$2 batch=$3
  [ "$wanted" = "  " ] || [[ $wanted == *" $name "* ]] || return 0
  "$carry/bin/llmq-step-bench" --model "$model" --backend cuda --quant "$quant" --batches "$batch" --prompt-len 16 \
    --decode-steps 64 --prefill 0 2>&1 | grep "decode batch" | sed "s/^/$name plain run: /"
  timeout 180 "$ncu" --target-processes all --clock-control none --metrics gpu__time_duration.sum -f -o "/tmp/ncu-$name" \
    "$carry/bin/llmq-step-bench" --model "$model" --backend cuda --quant "$quant" --batches "$batch" \
    --prompt-len 16 --decode-steps 4 --prefill 0 >"/tmp/ncu-$name.log" 2>&1 || { tail -5 "/tmp/ncu-$name.log"; return; }
  "$ncu" --import "/tmp/ncu-$name.ncu-rep" --csv --page raw >"$out/$name.raw.csv" 2>&1
  python3 - "$out/$name.raw.csv" "$name" <<'PY'
import collections, csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
cols, units = rows[head], rows[head + 1]
name_at, time_at = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
scale = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(units[time_at], 1e-3)
by = collections.defaultdict(list)
for r in rows[head + 2:]:
    if len(r) > time_at and r[time_at]:
        by[r[name_at].split("(")[0][:70]].append(float(r[time_at].replace(",", "")) * scale)
total = sum(sum(v) for v in by.values())
print(f"{sys.argv[2]}: {sum(len(v) for v in by.values())} kernel launches, {total:.0f} us of kernels in all")
for k, v in sorted(by.items(), key=lambda kv: -sum(kv[1])):
    print(f"  {len(v):5d} x {sum(v) / len(v):8.1f} us  {k}")
PY
}
durations durations-fp8-b1 fp8 1
durations durations-int8-b1 int8wo 1
durations durations-none-b1 none 1
profile gemv-bf16 none 1 gemv 16 gemv 1
profile gemv-int8 int8wo 1 gemv 16 gemv 1
profile gemv-fp8 fp8 1 gemv 16 gemv 1
profile w8a16-b16 int8wo 16 w8a16 16 w8a16 1
profile w8a16-b64 int8wo 64 w8a16 16 w8a16 1
profile stream-b1 int8wo 1 stream_linear 16 stream 1
profile stream-b16 int8wo 16 stream_linear 16 stream 1
profile stream-b64 int8wo 64 stream_linear 16 stream 1
profile stream16-b64 int8wo 64 stream_linear 16 stream16 1
profile stream-wide-b64 int8wo 64 stream_linear 16 stream-wide 1
profile w8a16-prefill int8wo 1 w8a16 8 w8a16 512
profile wgmma-prefill int8wo 1 wgmma_w8a16 8 wgmma 2048
# Prefill attention (the tensor-core kernel) over a 2048-token prompt: 16-bit and 8-bit caches.
profile attention-prefill none 1 attention_mma 2 "" 2048
profile attention-prefill-int8 int8wo 1 attention_mma 2 "" 2048
profile wgmma-fp8-prefill fp8 1 wgmma_fp8 8 wgmma 512
profile attention-b64 none 64 attention_kernel 8 gemm 128
