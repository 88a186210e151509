"""Block-sparse attention kernel vs PyTorch SDPA (cuDNN, FlashAttention-2) and flex_attention on one GPU.

For each shape (Wan 1.3B 480p, Wan 14B 720p, HunyuanVideo 720p) it times dense SDPA with the cuDNN and the
FlashAttention backends, our kernel at full density and at the Radial Attention density, and compiled
flex_attention with the very same block masks; it checks our output against SDPA (full density) and against a
float32 reference on sampled query blocks (Radial), and writes one JSON record per measurement.

    PYTHONPATH=$PWD python benchmarks/bench_attention_kernel.py --out benchmarks/results/attention_kernel.json

Runs from a bare checkout (no install, no diffusers): the project modules are loaded from their folders.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # name: (batch, heads, head_dim, grid (frames, height, width), text tokens, text position, attention sink)
    "wan1.3b_480p_81f": (1, 12, 128, (21, 30, 52), 0, "none", True),
    "wan14b_720p_81f": (1, 40, 128, (21, 45, 80), 0, "none", True),
    "hunyuan_720p_129f": (1, 24, 128, (33, 45, 80), 256, "after", False),
    # smoke test of this script on CPU (TRITON_INTERPRET=1 python ... --device cpu --shapes tiny)
    "tiny": (1, 2, 64, (3, 4, 10), 8, "after", True),
}


def _import_project():
    """The kernel and the Radial builder, from an installed vidaccel or straight from the repository folders."""
    try:
        from vidaccel.attention import radial
        from vidaccel.kernels import block_sparse_attention as bsa
        return bsa, radial
    except Exception:  # bare checkout on a GPU box: no install, maybe no diffusers
        pass
    for name in [n for n in sys.modules if n == "vidaccel" or n.startswith("vidaccel.")]:
        del sys.modules[name]
    for name, folder in (("vidaccel", ROOT / "vidaccel"), ("vidaccel.attention", ROOT / "vidaccel" / "attention"),
                         ("vidaccel.kernels", ROOT / "kernels")):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    bsa = importlib.import_module("vidaccel.kernels.block_sparse_attention")
    radial = importlib.import_module("vidaccel.attention.radial")
    return bsa, radial


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, *, device: str = "cuda", target_ms: float = 1000.0, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median of CUDA-event timings after a warm-up; repetitions sized to about target_ms."""
    if not device.startswith("cuda"):  # CPU smoke runs: wall clock
        fn()
        times = []
        for _ in range(min_reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max(target_ms / estimate, min_reps), max_reps))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def flex_block_mask(layout, ranges, device):
    """flex_attention BlockMask with the same visited pairs: layout blocks are full blocks; key blocks that
    only a dense range reaches are partial blocks, where the mask_mod keeps the range keys."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk, bs = layout.num_q_blocks, layout.num_kv_blocks, layout.block_n
    full = layout.block_mask()[0]
    starts = torch.arange(nk, device=device) * bs
    ends = torch.clamp(starts + bs, max=layout.kv_len)
    touched = torch.zeros(nk, dtype=torch.bool, device=device)
    for s, e in ranges:
        touched |= (starts < e) & (ends > s)
    partial = touched[None, :] & ~full

    def csr(mask):
        counts = mask.sum(-1, dtype=torch.int32)
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None].contiguous(), order[None, None].contiguous()

    # The mask_mod states the whole pattern (flex's eager path applies it everywhere); the compiled kernel only
    # evaluates it on the partial blocks and skips it on full ones.
    def in_pattern(b, h, q_idx, kv_idx):
        keep = full[q_idx // bs, kv_idx // bs]
        for s, e in ranges:
            keep = keep | ((kv_idx >= s) & (kv_idx < e))
        return keep

    p_cnt, p_idx = csr(partial)
    f_cnt, f_idx = csr(full)
    return BlockMask.from_kv_blocks(p_cnt, p_idx, f_cnt, f_idx, BLOCK_SIZE=bs, mask_mod=in_pattern,
                                    seq_lengths=(layout.q_len, layout.kv_len))


def sampled_reference_error(q, k, v, out, layout, ranges, q_blocks) -> float:
    """Max |out - reference| over the given query blocks (float32 reference, all heads)."""
    worst = 0.0
    blocks = layout.block_mask()[0]
    cols = torch.arange(layout.kv_len, device=q.device) // layout.block_n
    in_range = torch.zeros(layout.kv_len, dtype=torch.bool, device=q.device)
    for s, e in ranges:
        in_range[s:e] = True
    scale = 1.0 / math.sqrt(q.shape[-1])
    for qb in q_blocks:
        r0, r1 = qb * layout.block_m, min((qb + 1) * layout.block_m, layout.q_len)
        keep = blocks[qb][cols] | in_range
        for h0 in range(0, q.shape[1], 8):
            qs = q[:, h0:h0 + 8, r0:r1].float()
            scores = torch.matmul(qs, k[:, h0:h0 + 8].float().transpose(-1, -2)) * scale
            scores = scores.masked_fill(~keep, float("-inf"))
            ref = torch.matmul(torch.softmax(scores, dim=-1), v[:, h0:h0 + 8].float())
            worst = max(worst, (out[:, h0:h0 + 8, r0:r1].float() - ref).abs().max().item())
    return worst


def gpu_correctness(bsa, log):
    """Small GPU checks of both load paths against the reference: ragged, ranges, bshd views, per-head layouts."""
    torch.manual_seed(0)
    results = []
    cases = [
        (torch.bfloat16, "bshd", 2, 3, 1000, 1200, 128, "heads", [(0, 130), (1100, 1200)]),
        (torch.float16, "bhsd", 1, 4, 777, 777, 64, "one", [(5, 300)]),
    ]
    for dtype, tl_name, B, H, sq, skv, d, gmode, ranges in cases:
        shape = (lambda n: (B, H, n, d)) if tl_name == "bhsd" else (lambda n: (B, n, H, d))
        q, k, v = (torch.randn(shape(n), device="cuda", dtype=dtype) for n in (sq, skv, skv))
        groups = {"one": 1, "heads": H}[gmode]
        nq, nk = -(-sq // 128), -(-skv // 128)
        mask = torch.rand(groups, nq, nk, device="cuda") < 0.4
        mask[:, 0] = False
        layout = bsa.BlockLayout.from_block_mask(mask, 128, 128, q_len=sq, kv_len=skv)
        ref, ref_lse = bsa.block_sparse_attention_reference(q, k, v, layout, tensor_layout=tl_name,
                                                            dense_kv_ranges=ranges, return_lse=True)
        for cfg in (bsa.KernelConfig(128, 128, 8, 3, False), bsa.KernelConfig(128, 64, 4, 3, True),
                    bsa.KernelConfig(128, 64, 8, 2, True, maxnreg=128),
                    bsa.KernelConfig(128, 64, 8, 2, True, maxnreg=128, prefetch_index=True)):
            out, lse = bsa._forward(q, k, v, layout, tl_name, ranges, None, True, config=cfg)
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
            finite = torch.isfinite(ref_lse)
            lse_err = (lse[finite] - ref_lse[finite]).abs().max().item()
            ok = err < 3e-2 and lse_err < 1e-2 and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
            results.append({"dtype": str(dtype), "layout": tl_name, "config": str(cfg), "max_abs_err": err,
                            "lse_err": lse_err, "ok": bool(ok)})
            log(f"correctness {dtype} {tl_name} d={d} {cfg}: err {err:.3e} lse {lse_err:.3e} ok={ok}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attention_kernel.json"))
    parser.add_argument("--shapes", default=",".join(n for n in SHAPES if n != "tiny"))
    parser.add_argument("--sweep", action="store_true", help="time every tuning candidate on the first shape")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip remaining work after this many seconds")
    parser.add_argument("--device", default="cuda", help="cuda (measurements) or cpu (smoke test, interpreter)")
    args = parser.parse_args()
    dev = args.device
    on_gpu = dev.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        sys.exit("bench_attention_kernel needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1 for a smoke test)")

    t0 = time.time()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(msg):
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        log_lines.append(line)

    bsa, radial = _import_project()
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    log(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}")
    records, sweep_records = [], []

    def save():
        out_path.write_text(json.dumps(records, indent=1))
        if sweep_records:
            out_path.with_name(out_path.stem + "_sweep.json").write_text(json.dumps(sweep_records, indent=1))
        out_path.with_suffix(".log").write_text("\n".join(log_lines) + "\n")

    correctness = gpu_correctness(bsa, log) if on_gpu else []
    flex = None if args.no_flex else (torch.compile(flex_attention, dynamic=False) if on_gpu else flex_attention)

    def backend(which):
        return sdpa_kernel(which) if on_gpu else contextlib.nullcontext()

    baselines = {}  # shape name -> cuDNN dense ms, for the flex stage

    def run_shape(stage, index, name):
        B, H, D, grid, text, text_pos, sink = SHAPES[name]
        token_layout = radial.TokenLayout(*grid, text_tokens=text, text_position=text_pos)
        S = token_layout.total_tokens
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in range(3))
        flops_dense = 4.0 * B * H * S * S * D
        shape = {"name": name, "batch": B, "heads": H, "tokens": S, "head_dim": D, "dtype": args.dtype,
                 "grid": list(grid), "text_tokens": text}
        t_build = time.time()
        plan = radial.radial_block_layout(token_layout, attention_sink=sink, device=dev)
        sync(dev)
        if stage == "kernels":
            log(f"{name}: radial plan built in {time.time() - t_build:.2f}s: {plan.report()}")
        dense_layout = bsa.BlockLayout.dense(S, S, 128, device=dev)
        variants = {"full": (dense_layout, ()), "radial": (plan.layout, plan.dense_kv_ranges)}
        densities = {"full": 1.0, "radial": plan.density}

        def record(method, variant, ms, baseline_ms, **extra):
            density = densities[variant]
            rec = {"benchmark": "attention_kernel", "method": method, "date": date, "device": device_name,
                   "shape": shape, "density": round(density, 5), "baseline": "sdpa_cudnn_dense",
                   "baseline_ms": round(baseline_ms, 4), "method_ms": round(ms, 4),
                   "speedup": round(baseline_ms / ms, 4), "tflops": round(flops_dense * density / ms / 1e9, 1)}
            rec.update(extra)
            records.append(rec)
            save()
            log(f"{name} {method} [{variant} {density:.4f}] {ms:.3f} ms  speedup {baseline_ms / ms:.3f}x  "
                f"{rec['tflops']} TFLOP/s {extra}")

        if stage == "flex":
            cudnn_ms = baselines[name]
            for variant, (layout, ranges) in variants.items():
                block_mask = flex_block_mask(layout, ranges, dev)
                t_c = time.time()
                flex_out = flex(q, k, v, block_mask=block_mask)
                sync(dev)
                compile_s = time.time() - t_c
                ms = time_ms(lambda: flex(q, k, v, block_mask=block_mask), device=dev, target_ms=1000)
                ours = bsa.block_sparse_attention(q, k, v, layout, dense_kv_ranges=ranges)
                diff = (flex_out.float() - ours.float()).abs().max().item()
                record("flex_attention", variant, ms, cudnn_ms, first_call_s=round(compile_s, 1),
                       max_abs_diff_vs_ours=diff)
                del flex_out, ours
            return

        # Dense SDPA baselines.
        with backend(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device=dev)
            sdpa_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        baselines[name] = cudnn_ms
        record("sdpa_cudnn", "full", cudnn_ms, cudnn_ms)
        try:
            with backend(SDPBackend.FLASH_ATTENTION):
                fa_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device=dev)
            record("sdpa_flash", "full", fa_ms, cudnn_ms)
        except Exception as exc:  # noqa: BLE001
            log(f"{name} sdpa_flash failed: {exc!r}")

        if index == 0 and args.sweep:
            # Every candidate at full density; the four fastest of them again on the Radial layout.
            timed = {}
            for variant, (layout, ranges) in variants.items():
                configs = bsa._TUNING_CANDIDATES if variant == "full" else sorted(timed, key=timed.get)[:4]
                for cfg in configs:
                    try:
                        t_c = time.time()
                        bsa._forward(q, k, v, layout, "bhsd", ranges, config=cfg)
                        sync(dev)
                        compile_s = time.time() - t_c
                        ms = time_ms(lambda: bsa._forward(q, k, v, layout, "bhsd", ranges, config=cfg),
                                     device=dev, target_ms=400)
                        if variant == "full":
                            timed[cfg] = ms
                        sweep_records.append({"shape": name, "variant": variant, "density": densities[variant],
                                              "config": dataclasses.asdict(cfg), "ms": ms, "device": device_name,
                                              "speedup_vs_cudnn": cudnn_ms / ms, "first_call_s": compile_s})
                        log(f"sweep {variant} {cfg}: {ms:.3f} ms ({cudnn_ms / ms:.3f}x cuDNN) first call {compile_s:.1f}s")
                    except Exception as exc:  # noqa: BLE001
                        log(f"sweep {variant} {cfg} failed: {exc!r}"[:400])
                    save()

        # Our kernel through the public (autotuned) entry point, full density and Radial.
        for variant, (layout, ranges) in variants.items():
            call = lambda: bsa.block_sparse_attention(q, k, v, layout, dense_kv_ranges=ranges)  # noqa: E731
            t_first = time.time()
            ours = call()
            sync(dev)
            first_s = time.time() - t_first
            ms = time_ms(call, device=dev)
            if variant == "full":
                check = {"max_abs_err_vs_sdpa": (ours.float() - sdpa_out.float()).abs().max().item()}
            else:
                picks = sorted({0, layout.num_q_blocks // 2, layout.num_q_blocks - 1})
                check = {"max_abs_err_vs_reference_rows":
                         sampled_reference_error(q, k, v, ours, layout, ranges, picks)}
            tuned = getattr(bsa._block_sparse_attn_fwd_tuned, "best_config", None)
            record("vidaccel_block_sparse", variant, ms, cudnn_ms, first_call_s=round(first_s, 2),
                   config=str(tuned), ideal_ms=round(cudnn_ms * densities[variant], 4), **check)
            if variant == "radial" and index == 0:
                qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # diffusers' (B, S, H, D) view, same memory
                call_bshd = lambda: bsa.block_sparse_attention(qs, ks, vs, layout, tensor_layout="bshd",  # noqa: E731
                                                               dense_kv_ranges=ranges)
                record("vidaccel_block_sparse_bshd_view", variant, time_ms(call_bshd, device=dev), cudnn_ms)
            del ours

    for stage in ("kernels", "flex"):
        for index, name in enumerate(args.shapes.split(",")):
            if stage == "flex" and flex is None:
                continue
            if time.time() - t0 > args.budget_s:
                log(f"budget reached, skipping {stage} on {name}")
                continue
            try:
                run_shape(stage, index, name)
            except Exception as exc:  # noqa: BLE001
                log(f"{stage} {name} failed: {exc!r}"[:800])
            if on_gpu:
                torch.cuda.empty_cache()

    summary = {"correctness": correctness, "seconds": round(time.time() - t0, 1)}
    out_path.with_name(out_path.stem + "_checks.json").write_text(json.dumps(summary, indent=1))
    save()
    log("done")
    print("\nmethod                          shape                 density   ms        speedup  TFLOP/s")
    for r in records:
        print(f"{r['method']:31s} {r['shape']['name']:21s} {r['density']:.4f}  {r['method_ms']:9.3f}  "
              f"{r['speedup']:6.3f}x  {r['tflops']}")


if __name__ == "__main__":
    main()
