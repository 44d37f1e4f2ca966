#!/usr/bin/env bash
# Regenerates docs/benchmarks/cpu-sweep/: the quantization trade-off sweep (llmq-sweep) on the
# CPU, on the cpu-512 synthetic Llama shape (written into build/ once), plus the machine it ran on.
# Usage: bash scripts/cpu-sweep.sh [extra llmq-sweep flags]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/build.sh"
model="$root/build/models/cpu-512"
[ -f "$model/config.json" ] || "$root/build/bin/llmq-synth" --out "$model" --shape cpu-512
out="$root/docs/benchmarks/cpu-sweep"
mkdir -p "$out"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(git -C "$root" rev-parse --short HEAD)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  "$root/build/bin/llmq-sweep" --model "$model" --out "$out" --input-len 128 --output-len 32 \
    --batches 1,2,4,8,16,32,64,128 "$@"
} | tee "$out/summary.txt"
sed -i "s|$root/||g" "$out/summary.txt" "$out/sweep.json"
