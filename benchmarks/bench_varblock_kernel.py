"""Variable-block (SVG2) sparse attention kernel vs dense cuDNN SDPA on one GPU.

For Wan 2.1-1.3B 480p (B1 H12 N32760 D128) and Wan 2.1-14B 720p (B1 H40 N75600 D128), bf16, with synthetic
cluster layouts (cluster sizes uniform in [0.5, 1.5] x N/C, Ck = 1000 key clusters, Cq query clusters) and per
query cluster a random set of key clusters filling the target density, it times:
  * dense SDPA with the cuDNN backend (the baseline);
  * ``varblock_sparse_attention`` at densities ~10/20/30/50/100%, key modes "packed", "indexed" and "ranges", with and
    without the 64-row remainder launch, the whole call (plan built on device + kernel) and, at 30%, the kernel
    alone with a prebuilt plan;
  * at 30%: the tuning candidates one by one (first shape), query tiles of 64 rows, the same layout through the
    fixed-block kernel (``block_sparse_attention`` over every 128x128 block the layout touches: a superset, shown
    for speed only) and the fixed-block kernel on random 128x128 blocks at the same density (its speed without
    clusters: the gap to it is tile padding plus index search; ``work_density_bn64`` is the padded work);
and checks the output against a float32 masked-softmax reference on a few whole query clusters of two heads.
One JSON record per measurement (``benchmark, method, date, device, shape, density, baseline_ms, method_ms,
speedup`` plus details); every section is guarded, failures are recorded and the run goes on.

    python benchmarks/bench_varblock_kernel.py --out benchmarks/results/varblock_kernel.json    # H100, < 3 min
    python benchmarks/bench_varblock_kernel.py --out /tmp/varblock_smoke.json --smoke           # CPU, seconds

Runs from a bare checkout (no install): the project modules are loaded from their folders.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (batch, heads, tokens, head_dim, query-cluster counts for the density sweep, key clusters)
SHAPES = {
    "wan1.3b_480p_81f": (1, 12, 32760, 128, (100, 400), 1000),
    "wan14b_720p_81f": (1, 40, 75600, 128, (100,), 1000),
}
SMOKE_SHAPES = {"smoke": (1, 2, 64, 32, (4,), 10)}
DENSITIES = (0.1, 0.2, 0.3, 0.5, 1.0)
# Extra launch configurations swept for key_mode="indexed" at the focus density, as VarBlockConfig arguments
# (block_n, num_warps, num_stages, maxnreg).
INDEXED_SWEEP_ARGS = ((32, 8, 5, None), (32, 4, 5, None), (64, 4, 3, None), (128, 8, 2, None))
FOCUS_DENSITY = 0.3


def _import_project():
    """The kernels, from an installed vidaccel or straight from the repository folder."""
    try:
        from vidaccel.kernels import block_sparse_attention as bsa
        from vidaccel.kernels import varblock_attention as vba
        return bsa, vba
    except Exception:  # bare checkout on a GPU box
        pass
    for name in [n for n in sys.modules if n == "vidaccel" or n.startswith("vidaccel.")]:
        del sys.modules[name]
    for name, folder in (("vidaccel", ROOT / "vidaccel"), ("vidaccel.kernels", ROOT / "kernels")):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    return (importlib.import_module("vidaccel.kernels.block_sparse_attention"),
            importlib.import_module("vidaccel.kernels.varblock_attention"))


def time_ms(fn, on_gpu: bool, warmup: int = 3, reps: int = 20) -> float:
    """Median of per-call CUDA-event timings after warm-up (wall clock on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if not on_gpu:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def cluster_offsets(batch, heads, n, clusters, gen, device):
    """(B, H, C + 1) int32 offsets of random cluster sizes around n / C (uniform weights in [0.5, 1.5])."""
    import torch

    weights = 0.5 + torch.rand(batch, heads, clusters, generator=gen)
    sizes = torch.floor(weights / weights.sum(-1, keepdim=True) * n).long()
    missing = n - sizes.sum(-1, keepdim=True)  # < C: one more token for the first clusters
    sizes += (torch.arange(clusters) < missing).long()
    zero = torch.zeros(batch, heads, 1, dtype=torch.long)
    return torch.cat([zero, sizes.cumsum(-1)], -1).to(torch.int32).to(device)


def random_selection(k_offsets, q_clusters, density, gen, device):
    """Per query cluster, key clusters in random order until their tokens reach density x Nk."""
    import torch

    B, H, ck1 = k_offsets.shape
    k_sizes = (k_offsets[..., 1:] - k_offsets[..., :-1]).long()
    n_k = k_offsets[..., -1:].long().unsqueeze(-1)
    order = torch.argsort(torch.rand(B, H, q_clusters, ck1 - 1, generator=gen).to(device), dim=-1)
    sizes_in_order = torch.gather(k_sizes.unsqueeze(2).expand(-1, -1, q_clusters, -1), -1, order)
    before = torch.cumsum(sizes_in_order, -1) - sizes_in_order
    keep = before < density * n_k
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def reference_error(q, k, v, out, q_offsets, k_offsets, selected, heads, clusters_per_head=3):
    """Max abs error of ``out`` against a float32 masked softmax on a few whole query clusters (the largest,
    the first and the last) of the given heads; also checks rows that select nothing are exactly 0."""
    import torch

    worst, rows_checked = 0.0, 0
    D = q.shape[-1]
    for h in heads:
        qo, ko = q_offsets[0, h].long(), k_offsets[0, h].long()
        k_cluster = torch.searchsorted(ko[1:].contiguous(), torch.arange(k.shape[2], device=k.device), right=True)
        sizes = qo[1:] - qo[:-1]
        picks = {int(torch.argmax(sizes)), 0, sizes.numel() - 1}
        for c in list(picks)[:clusters_per_head]:
            rows = slice(int(qo[c]), int(qo[c + 1]))
            if rows.stop == rows.start:
                continue
            keys = selected[0, h, c][k_cluster]
            expected = torch.zeros(rows.stop - rows.start, D, device=q.device)
            if bool(keys.any()):
                scores = (q[0, h, rows].float() @ k[0, h][keys].float().T) / math.sqrt(D)
                expected = torch.softmax(scores, -1) @ v[0, h][keys].float()
            worst = max(worst, float((out[0, h, rows].float() - expected).abs().max()))
            rows_checked += rows.stop - rows.start
    return worst, rows_checked


def work_density(q_offsets, k_offsets, selected, block_m, remainder_block_m=None, block_n=64):
    """Fraction of Nq x Nk the packed kernel multiplies: every query cluster pays ceil(size / block_m) full
    tiles of rows (a tail of at most remainder_block_m rows: one tile of that height) and ceil(keys / block_n)
    full tiles of keys (tile padding included)."""
    import torch

    q_sizes = (q_offsets[..., 1:] - q_offsets[..., :-1]).double()
    k_sizes = (k_offsets[..., 1:] - k_offsets[..., :-1]).double()
    keys = torch.matmul(selected.double(), k_sizes.unsqueeze(-1)).squeeze(-1)  # (B, H, Cq)
    rows = torch.ceil(q_sizes / block_m) * block_m
    if remainder_block_m:
        tail = q_sizes % block_m
        short = (tail > 0) & (tail <= remainder_block_m)
        rows = torch.where(short, rows - block_m + remainder_block_m, rows)
    padded_keys = torch.ceil(keys / block_n) * block_n
    total = q_offsets[..., -1].double() * k_offsets[..., -1].double()
    return float(((rows * padded_keys).sum(-1) / total).mean())


def fixed_block_layout(bsa, q_offsets, k_offsets, selected, n, block=128):
    """Every block pair (per head) that contains at least one selected token pair."""
    import torch

    blocks = -(-n // block)
    starts = torch.arange(blocks, device=q_offsets.device) * block
    ends = torch.clamp(starts + block, max=n)

    def incidence(off):  # (B, H, blocks, C): block overlaps a nonempty cluster
        lo, hi = off[..., :-1].unsqueeze(-2), off[..., 1:].unsqueeze(-2)
        return ((lo < ends[:, None]) & (hi > starts[:, None]) & (hi > lo)).float()

    a, b = incidence(q_offsets), incidence(k_offsets)
    mask = (a @ selected.float() @ b.transpose(-1, -2)) > 0
    B, H = selected.shape[:2]
    return bsa.BlockLayout.from_block_mask(mask.reshape(B * H, blocks, blocks), block, block, q_len=n, kv_len=n)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the records")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--budget-s", type=float, default=165.0, help="skip remaining sections after this")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first Triton import

    import torch

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        sys.exit("bench_varblock_kernel needs a CUDA GPU (or --smoke for a CPU check of this script)")
    dev = "cuda" if on_gpu else "cpu"
    bsa, vba = _import_project()
    INDEXED_SWEEP = [vba.VarBlockConfig(*a) for a in INDEXED_SWEEP_ARGS]
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = {name: shapes[name] for name in args.shapes.split(",")}
    dtype = torch.bfloat16 if on_gpu else torch.float32
    densities = (0.3, 1.0) if args.smoke else DENSITIES
    warmup, reps = (0, 1) if args.smoke else (3, 20)
    tile_m, fixed_tile = (128, 128) if on_gpu else (32, 32)  # small tiles keep the interpreter quick
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu (smoke)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    t0 = time.time()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    records = []

    def save():
        out_path.write_text(json.dumps(records, indent=1))

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    def over_budget():
        return time.time() - t0 > args.budget_s

    def section(name, fn, *fn_args):
        """Run one measurement; record a failure or a skip instead of stopping."""
        if over_budget():
            records.append({"benchmark": "varblock_kernel", "section": name, "skipped": "time budget"})
            save()
            return None
        try:
            return fn(*fn_args)
        except Exception as exc:  # noqa: BLE001
            records.append({"benchmark": "varblock_kernel", "section": name, "error": repr(exc),
                            "traceback": traceback.format_exc()[-2000:]})
            save()
            log(f"{name} FAILED: {exc!r}")
            if on_gpu:
                torch.cuda.empty_cache()
            return None

    log(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}")
    for shape_index, (shape_name, (B, H, N, D, q_cluster_counts, k_clusters)) in enumerate(shapes.items()):
        if over_budget():
            break
        gen = torch.Generator().manual_seed(shape_index)
        torch.manual_seed(shape_index)  # q, k, v drawn on the device (CPU draws of 720p take seconds)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(3))
        shape = {"name": shape_name, "batch": B, "heads": H, "tokens": N, "head_dim": D, "dtype": str(dtype)}
        flops_dense = 4.0 * B * H * N * N * D
        backend = SDPBackend.CUDNN_ATTENTION if on_gpu else SDPBackend.MATH

        def dense():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        baseline_ms = section(f"{shape_name}/sdpa_cudnn", time_ms, dense, on_gpu, warmup, reps)
        if baseline_ms is None:
            continue
        log(f"{shape_name}: dense SDPA ({backend.name}) {baseline_ms:.3f} ms")

        def record(method, density, ms, **extra):
            rec = {"benchmark": "varblock_kernel", "method": method, "date": date, "device": device_name,
                   "shape": shape, "density": round(float(density), 5), "baseline": f"sdpa_{backend.name.lower()}",
                   "baseline_ms": round(baseline_ms, 4), "method_ms": round(ms, 4),
                   "speedup": round(baseline_ms / ms, 4),
                   "tflops_effective": round(flops_dense * float(density) / ms / 1e9, 1)}
            rec.update(extra)
            records.append(rec)
            save()
            log(f"{shape_name} {method} density {density:.3f}: {ms:.3f} ms, {baseline_ms / ms:.2f}x "
                f"{ {k_: v_ for k_, v_ in extra.items() if k_ != 'layout'} }")

        record(f"sdpa_{backend.name.lower()}", 1.0, baseline_ms)
        k_off = cluster_offsets(B, H, N, k_clusters, gen, dev)
        for q_clusters in q_cluster_counts:
            q_off = cluster_offsets(B, H, N, q_clusters, gen, dev)
            for density_target in densities:
                if over_budget():
                    break
                sel = random_selection(k_off, q_clusters, density_target, gen, dev)
                density = float(vba.varblock_density(q_off, k_off, sel).mean())
                layout = {"q_clusters": q_clusters, "k_clusters": k_clusters, "target_density": density_target}
                focus = density_target == FOCUS_DENSITY
                # Packed everywhere; ranges across densities on the first layout only, else at the focus density;
                # 64-row query tiles at the focus density of the first shape (keeps the run under 3 minutes).
                # Short cluster tails in 64-row tiles (remainder launch) wherever ranges run.
                first_layout = shape_index == 0 and q_clusters == q_cluster_counts[0]
                modes = [("packed", tile_m, None), ("indexed", tile_m, None)]
                if first_layout or focus:
                    modes += [("ranges", tile_m, None), ("packed", tile_m, tile_m // 2),
                              ("indexed", tile_m, tile_m // 2)]
                if focus and shape_index == 0 and on_gpu:
                    modes.append(("packed", 64, None))
                for key_mode, block_m, rem_m in modes:
                    name = f"{shape_name}/Cq{q_clusters}/d{density_target}/{key_mode}/bm{block_m}/rem{rem_m}"

                    def measure(key_mode=key_mode, block_m=block_m, rem_m=rem_m):
                        call = lambda: vba.varblock_sparse_attention(  # noqa: E731
                            q, k, v, q_off, k_off, sel, key_mode=key_mode, block_m=block_m, remainder_block_m=rem_m)
                        t_first = time.time()
                        out = call()
                        if on_gpu:
                            torch.cuda.synchronize()
                        first_s = time.time() - t_first
                        heads = sorted({0, H - 1})
                        err, rows = reference_error(q, k, v, out, q_off, k_off, sel, heads)
                        del out
                        ms = time_ms(call, on_gpu, warmup, reps)
                        extra = {"key_mode": key_mode, "block_m": block_m, "remainder_block_m": rem_m,
                                 "includes_plan": True,
                                 "work_density_bn64": round(work_density(q_off, k_off, sel, block_m, rem_m), 5),
                                 "first_call_s": round(first_s, 2), "max_abs_err_vs_fp32": err,
                                 "rows_checked": rows, "layout": layout}
                        tuned = getattr(vba._varblock_attn_fwd_tuned, "best_config", None)
                        if on_gpu and tuned is not None:
                            extra["config"] = str(tuned)
                        suffix = f"_rem{rem_m}" if rem_m else ""
                        record(f"varblock_{key_mode}{suffix}", density, ms, **extra)
                        if focus and block_m == tile_m:
                            runs = key_mode != "indexed"  # the indexed walk needs no merged runs
                            plan = vba.build_varblock_plan(q_off, k_off, sel, N, block_m, rem_m, key_runs=runs)
                            plan_ms = time_ms(lambda: vba.build_varblock_plan(q_off, k_off, sel, N, block_m, rem_m,
                                                                              key_runs=runs),
                                              on_gpu, warmup, reps)
                            kernel_ms = time_ms(lambda: vba._forward(q, k, v, q_off, k_off, sel, key_mode=key_mode,
                                                                     block_m=block_m, remainder_block_m=rem_m,
                                                                     plan=plan), on_gpu, warmup, reps)
                            more = {}
                            if key_mode == "indexed":  # part of kernel_only: the token lists are written per call
                                more["token_list_ms"] = round(time_ms(lambda: vba.write_key_tokens(plan, N), on_gpu,
                                                                      warmup, reps), 4)
                            record(f"varblock_{key_mode}{suffix}_kernel_only", density, kernel_ms,
                                   key_mode=key_mode, block_m=block_m, remainder_block_m=rem_m,
                                   plan_ms=round(plan_ms, 4), layout=layout, **more)

                    section(name, measure)

                if focus and shape_index == 0 and q_clusters == q_cluster_counts[0] and not args.smoke:
                    # Every tuning candidate of the 128-row tile, per key mode.
                    def sweep():
                        for key_mode in ("packed", "indexed", "ranges"):
                            plan = vba.build_varblock_plan(q_off, k_off, sel, N, 128,
                                                           key_runs=key_mode != "indexed")
                            if key_mode == "indexed":  # deeper pipelines: the token list is fetched a stage ahead
                                configs = list(vba._INDEXED_TUNING_CANDIDATES[128])
                                configs += [c for c in INDEXED_SWEEP if c not in configs]
                            else:
                                configs = list(vba._TUNING_CANDIDATES[128])
                            for cfg in configs:
                                ms = time_ms(lambda: vba._forward(q, k, v, q_off, k_off, sel, key_mode=key_mode,
                                                                  block_m=128, remainder_block_m=None, plan=plan,
                                                                  config=cfg),
                                             on_gpu, warmup, reps)
                                record(f"varblock_{key_mode}_kernel_only_config", density, ms, key_mode=key_mode,
                                       config=str(cfg), layout=layout)

                    section(f"{shape_name}/sweep", sweep)

                if focus and q_clusters == q_cluster_counts[0]:
                    def fixed_block():
                        block_layout = fixed_block_layout(bsa, q_off, k_off, sel, N, fixed_tile)
                        ms = time_ms(lambda: bsa.block_sparse_attention(q, k, v, block_layout), on_gpu, warmup,
                                     reps)
                        record("fixed_block_superset", density, ms, block_density=round(block_layout.density, 4),
                               note="block_sparse_attention over every 128x128 block the layout touches",
                               layout=layout)

                    section(f"{shape_name}/fixed_block", fixed_block)

                    def fixed_block_same_density():
                        # Random 128x128 blocks at the same density: the fixed-block kernel's speed with no
                        # ragged clusters, to separate tile padding and index search from the rest.
                        blocks = -(-N // fixed_tile)
                        mask = torch.rand(B * H, blocks, blocks, generator=gen) < density
                        block_layout = bsa.BlockLayout.from_block_mask(mask.to(dev), fixed_tile, fixed_tile,
                                                                       q_len=N, kv_len=N)
                        ms = time_ms(lambda: bsa.block_sparse_attention(q, k, v, block_layout), on_gpu, warmup,
                                     reps)
                        record("fixed_block_random_blocks", block_layout.density, ms,
                               note="block_sparse_attention, random blocks at the varblock density (reference "
                                    "speed without clusters)", layout=layout)

                    section(f"{shape_name}/fixed_block_same_density", fixed_block_same_density)
        q = k = v = None  # free the inputs before the next shape
        if on_gpu:
            torch.cuda.empty_cache()

    save()
    log(f"wrote {len(records)} records to {out_path}")
    for r in records:
        if "method_ms" in r:
            print(f"  {r['shape']['name']:18s} {r['method']:38s} d={r['density']:.3f} {r['method_ms']:9.3f} ms "
                  f"{r['speedup']:6.2f}x  err={r.get('max_abs_err_vs_fp32', '-')}")
        else:
            print(f"  {r.get('section')}: {r.get('error', r.get('skipped'))}")


if __name__ == "__main__":
    main()
