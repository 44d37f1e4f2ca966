#!/usr/bin/env python3
"""PyTorch peer timings for the GPU check.

Times the GEMMs and attention of one Llama-2-7B decode / prefill step through plain PyTorch
(bf16 matmul, fp8 torch._scaled_mm, SDPA) so the check can print llmq/PyTorch ratios.
Norms, RoPE, activations and sampling are not timed: this is a lower bound on an eager step.
Human-readable lines go to stderr; one JSON object goes to stdout (and to --json PATH).
"""
import argparse
import json
import math
import statistics
import sys
import time

H, I, LAYERS, HEADS, HD, VOCAB = 4096, 11008, 32, 32, 128, 32000
DECODE = (1, 16, 64)
PREFILL = 2048
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Per layer: (name, N, K, uses per layer); weights are [N, K] like nn.Linear.
SHAPES = (("qkvo", H, H, 4), ("gate_up", I, H, 2), ("down", H, I, 1))
LAYER_PARAMS = LAYERS * sum(n * k * c for _, n, k, c in SHAPES)
LM_PARAMS = VOCAB * H


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """Median GPU ms per call, measured with CUDA events.

    Each timed repetition first queues a spin kernel (torch.cuda._sleep) long enough for the host
    to enqueue all calls behind it, so the events measure GPU time, not Python launch overhead.
    """

    def __init__(self, torch, reps, warmup):
        self.torch, self.reps, self.warmup = torch, reps, warmup
        self.cyc_per_ms = 0.0
        try:  # calibrate the spin kernel: cycles per millisecond
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(3):  # keep the fastest: clocks may still be ramping up on the first spins
                s.record(); torch.cuda._sleep(4_000_000); e.record(); e.synchronize()
                self.cyc_per_ms = max(self.cyc_per_ms, 4_000_000 / max(s.elapsed_time(e), 1e-3))
        except Exception as ex:  # timings then include launch gaps for tiny kernels
            log(f"note: torch.cuda._sleep unavailable ({ex}); small-kernel times may be host-bound")

    def __call__(self, fn, inner):
        torch = self.torch
        host_ms = 0.0
        for _ in range(self.warmup):
            t0 = time.perf_counter()
            for i in range(inner):
                fn(i)
            host_ms = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()
        cycles = int(self.cyc_per_ms * min(50.0, 2.0 * host_ms + 1.0))
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.reps):
            if cycles:
                torch.cuda._sleep(cycles)
            s.record()
            for i in range(inner):
                fn(i)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / inner)
        return statistics.median(times)


def rotating(make, nbytes, rot_bytes):
    """Enough copies of a tensor that cycling through them defeats L2 (as 32 distinct layers would)."""
    n = max(1, min(32, math.ceil(rot_bytes / max(nbytes, 1))))
    return [make() for _ in range(n)]


def inner_for(n):
    return n * math.ceil(8 / n)  # at least 8 calls per timed repetition, whole passes over copies


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=512, help="decode KV length L (default 512)")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    ap.add_argument("--json", metavar="PATH", help="also write the JSON object here")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, for smoke runs")
    args = ap.parse_args()
    try:
        import torch
    except Exception as ex:
        log(f"torch_peer: cannot import torch: {ex}")
        return 1
    if not torch.cuda.is_available():
        log(f"torch_peer: CUDA unavailable (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        return 1

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    reps, warmup = (3, 1) if args.quick else (max(args.reps, 1), 3)
    bench = Bench(torch, reps, warmup)
    props = torch.cuda.get_device_properties(0)
    rot = max(512 << 20, 8 * int(getattr(props, "L2_cache_size", 0) or 0))
    errors = []
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "context": args.context, "ceilings": {"copy_gbs": None, "bf16_tflops": None}, "rows": [], "errors": errors}
    log(f"torch_peer: {out['device']}, torch {torch.__version__}, context {args.context}, reps {reps}")
    gemm = {"bf16": {}, "fp8": {}}  # mode -> M -> {shape name: ms}
    lm, quant, attn = {}, {}, {}  # lm_head ms by rows; act-quant ms per step by M; attention ms per step

    def section(name, fn):
        try:
            fn()
        except Exception as ex:
            errors.append(f"{name}: {type(ex).__name__}: {ex}")
            log(f"  {name} failed: {type(ex).__name__}: {ex}")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # free the section's tensors before the next one

    def ceilings():
        src = torch.ones(1 << 31, dtype=torch.uint8, device=dev)  # 2 GiB
        dst = torch.empty_like(src)
        ms = bench(lambda i: dst.copy_(src), 4)
        out["ceilings"]["copy_gbs"] = round(2 * src.numel() / (ms * 1e-3) / 1e9, 1)
        del src, dst
        a = torch.randn(8192, 8192, dtype=bf16, device=dev)
        b = torch.randn(8192, 8192, dtype=bf16, device=dev)
        ms = bench(lambda i: torch.matmul(a, b), 4)
        out["ceilings"]["bf16_tflops"] = round(2 * 8192 ** 3 / (ms * 1e-3) / 1e12, 1)
        log(f"  ceilings: copy {out['ceilings']['copy_gbs']} GB/s, bf16 matmul {out['ceilings']['bf16_tflops']} TFLOP/s")

    def gemm_bf16():
        for name, n, k, _ in SHAPES:
            ws = rotating(lambda: torch.randn(n, k, dtype=bf16, device=dev) * 0.02, 2 * n * k, rot)
            for m in DECODE + (PREFILL,):
                x = torch.randn(m, k, dtype=bf16, device=dev)
                ms = bench(lambda i: torch.matmul(x, ws[i % len(ws)].t()), inner_for(len(ws)))
                gemm["bf16"].setdefault(m, {})[name] = ms
                log(f"  bf16 {name:7s} [{n}x{k}] M={m:4d}: {ms * 1e3:8.1f} us")
            del ws
        ws = rotating(lambda: torch.randn(VOCAB, H, dtype=bf16, device=dev) * 0.02, 2 * LM_PARAMS, rot)
        for m in DECODE:  # prefill needs logits for its last token only: rows = 1
            x = torch.randn(m, H, dtype=bf16, device=dev)
            lm[m] = bench(lambda i: torch.matmul(x, ws[i % len(ws)].t()), inner_for(len(ws)))
            log(f"  bf16 lm_head rows={m:2d}: {lm[m] * 1e3:8.1f} us")

    def gemm_fp8():
        major, minor = torch.cuda.get_device_capability(0)
        if (major, minor) < (8, 9) or not hasattr(torch, "float8_e4m3fn"):
            raise RuntimeError(f"fp8 needs compute capability >= 8.9 and torch.float8_e4m3fn (sm_{major}{minor})")
        f8, one = torch.float8_e4m3fn, torch.ones((), dtype=torch.float32, device=dev)

        def smm(a, b):  # older torch returned (out, amax)
            r = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=bf16)
            return r[0] if isinstance(r, tuple) else r

        def act_quant(x):  # dynamic per-tensor scale, as an fp8 engine would do per linear input
            s = x.abs().amax().float().clamp_min(1e-12) / FP8_MAX
            return (x / s).to(f8), s

        for name, n, k, _ in SHAPES:
            ws = rotating(lambda: torch.randn(n, k, dtype=bf16, device=dev).to(f8), n * k, rot)
            for m in DECODE + (PREFILL,):
                mp = 16 * math.ceil(m / 16)  # _scaled_mm wants M, N, K multiples of 16
                x = torch.randn(mp, k, dtype=bf16, device=dev).to(f8)
                ms = bench(lambda i: smm(x, ws[i % len(ws)].t()), inner_for(len(ws)))  # .t(): column-major
                gemm["fp8"].setdefault(m, {})[name] = ms
                log(f"  fp8  {name:7s} [{n}x{k}] M={m:4d}{f' (padded to {mp})' if mp != m else ''}: {ms * 1e3:8.1f} us")
            del ws
        for m in DECODE + (PREFILL,):
            # Distinct linear inputs per layer: attn-in (q,k,v), o-in, mlp-in (gate,up): [M,4096]; down-in: [M,11008].
            xh, xi = torch.randn(m, H, dtype=bf16, device=dev), torch.randn(m, I, dtype=bf16, device=dev)
            th, ti = bench(lambda i: act_quant(xh), 8), bench(lambda i: act_quant(xi), 8)
            quant[m] = LAYERS * (3 * th + ti)
            log(f"  fp8  act quant M={m:4d}: [M,{H}] {th * 1e3:.1f} us, [M,{I}] {ti * 1e3:.1f} us, {quant[m]:.3f} ms/step")

    def attention():
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for b in DECODE:
            kv_bytes = 2 * 2 * b * HEADS * args.context * HD
            if kv_bytes > 8 << 30:
                raise RuntimeError(f"context {args.context} needs {kv_bytes >> 20} MiB of K/V at batch {b}; too large")
            q = torch.randn(b, HEADS, 1, HD, dtype=bf16, device=dev)
            kvs = rotating(lambda: (torch.randn(b, HEADS, args.context, HD, dtype=bf16, device=dev),
                                    torch.randn(b, HEADS, args.context, HD, dtype=bf16, device=dev)), kv_bytes, rot)
            ms = bench(lambda i: sdpa(q, *kvs[i % len(kvs)], is_causal=False), inner_for(len(kvs)))
            attn[("decode", b)] = LAYERS * ms
            log(f"  sdpa decode B={b:2d} L={args.context}: {ms * 1e3:8.1f} us/layer")
            del q, kvs
        qkv = [torch.randn(1, HEADS, PREFILL, HD, dtype=bf16, device=dev) for _ in range(3)]
        ms = bench(lambda i: sdpa(*qkv, is_causal=True), 8)
        attn[("prefill", PREFILL)] = LAYERS * ms
        log(f"  sdpa prefill T={PREFILL} causal: {ms * 1e3:8.1f} us/layer")

    section("ceilings", ceilings)
    section("gemm_bf16", gemm_bf16)
    section("gemm_fp8", gemm_fp8)
    section("attention", attention)

    def r4(v):
        return None if v is None else round(v, 4)

    for mode in ("bf16", "fp8", "fp8_with_act_quant"):
        per = gemm["bf16" if mode == "bf16" else "fp8"]
        for phase, m in [("decode", b) for b in DECODE] + [("prefill", PREFILL)]:
            rows_lm = m if phase == "decode" else 1
            g = None
            if m in per and len(per[m]) == len(SHAPES) and (rows_lm in lm):
                g = LAYERS * sum(c * per[m][name] for name, _, _, c in SHAPES) + lm[rows_lm]
                if mode == "fp8_with_act_quant":
                    g = g + quant[m] if m in quant else None
            if g is None and mode != "bf16" and not gemm["fp8"]:
                continue  # fp8 unsupported: error already recorded, emit no rows
            a = attn.get((phase, m))
            step = g + a if g is not None and a is not None else None
            notes = [f"gemm=32x(4 qkvo+2 gate_up+1 down)+lm_head({rows_lm} row{'s' if rows_lm > 1 else ''}, bf16)",
                     f"attn=32x sdpa {'L=%d' % args.context if phase == 'decode' else 'causal T=2048'}"]
            if mode != "bf16" and m % 16:
                notes.append(f"fp8 M padded {m}->{16 * math.ceil(m / 16)}")
            if mode == "fp8_with_act_quant":
                notes.append("includes dynamic per-tensor act quant (4 inputs/layer)")
            wb = None
            if phase == "decode" and step:
                nbytes = LAYER_PARAMS * (2 if mode == "bf16" else 1) + 2 * LM_PARAMS
                wb = nbytes / (step * 1e-3) / 1e9
                notes.append(f"weight_gbs = {nbytes / 1e9:.3f} GB / step_ms")
            out["rows"].append({"mode": mode, "phase": phase, "tokens": m, "gemm_ms": r4(g), "attn_ms": r4(a),
                                "step_ms": r4(step), "tokens_per_s": r4(m / (step * 1e-3)) if step else None,
                                "weight_gbs": r4(wb), "note": "; ".join(notes)})

    log(f"{'mode':20s} {'phase':8s} {'tok':>5s} {'gemm ms':>9s} {'attn ms':>9s} {'step ms':>9s} {'tok/s':>10s} {'GB/s':>8s}")
    for r in out["rows"]:
        f = lambda v, p: "-" if v is None else f"{v:.{p}f}"
        log(f"{r['mode']:20s} {r['phase']:8s} {r['tokens']:5d} {f(r['gemm_ms'], 3):>9s} {f(r['attn_ms'], 3):>9s} "
            f"{f(r['step_ms'], 3):>9s} {f(r['tokens_per_s'], 1):>10s} {f(r['weight_gbs'], 1):>8s}")
    text = json.dumps(out)
    print(text, flush=True)
    if args.json:
        try:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
        except OSError as ex:
            log(f"torch_peer: cannot write {args.json}: {ex}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
