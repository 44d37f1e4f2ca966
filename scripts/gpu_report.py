#!/usr/bin/env python3
"""Prints the GPU check's table: llmq-step-bench results next to the PyTorch peer's, as ratios.

usage: gpu_report.py LLMQ_JSON TORCH_JSON

MBU (model bandwidth utilization) is the bytes a decode step must read (weights + KV cache) over
the step time, divided by the device-to-device copy bandwidth the peer measured in the same run.
The peer for int8wo is PyTorch bf16 (PyTorch has no INT8 weight-only GEMM); for fp8 it is
torch._scaled_mm including its dynamic activation quantization.
"""
import json
import sys

PEER = {"none": "bf16", "int8wo": "bf16", "fp8": "fp8_with_act_quant"}


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"gpu_report: cannot read {path}: {e}", file=sys.stderr)
        return {}


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    llmq, torch = load(sys.argv[1]), load(sys.argv[2])
    copy_gbs = (torch.get("ceilings") or {}).get("copy_gbs")
    peers = {(r["mode"], r["phase"], r["tokens"]): r for r in torch.get("rows", [])}
    print(f"device: {llmq.get('device', '?')}; PyTorch {torch.get('torch', '?')} on {torch.get('device', '?')}")
    print(f"ceilings measured by the peer: copy {fmt(copy_gbs, '.0f')} GB/s, bf16 matmul "
          f"{fmt((torch.get('ceilings') or {}).get('bf16_tflops'), '.0f')} TFLOP/s")
    print()
    print("| mode | phase | tokens | llmq ms/step | llmq tok/s | read GB/s | MBU | peer | peer ms/step | peer tok/s | llmq/peer tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in llmq.get("rows", []):
        peer = peers.get((PEER.get(r["mode"], "?"), r["phase"], r["tokens"]))
        decode = r["phase"] == "decode"
        mbu = r["read_gbs"] / copy_gbs if decode and copy_gbs else None
        ratio = r["tokens_per_s"] / peer["tokens_per_s"] if peer and peer.get("tokens_per_s") else None
        print(f"| {r['mode']} | {r['phase']} | {r['tokens']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{fmt(r['read_gbs'] if decode else None, '.0f')} | {fmt(mbu, '.0%')} | "
              f"{peer['mode'] if peer else '-'} | {fmt(peer and peer.get('step_ms'), '.2f')} | "
              f"{fmt(peer and peer.get('tokens_per_s'), '.0f')} | {fmt(ratio, '.2f')} |")
    for e in torch.get("errors", []):
        print(f"peer error: {e}")


if __name__ == "__main__":
    main()
