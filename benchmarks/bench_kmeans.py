"""SVG2 clustering overhead on one GPU: k-means assignment/update, warm-started q+k clustering, cluster sort and
q/k/v permutation, next to dense cuDNN attention of the same layer.

For Wan 1.3B 480p (B1 H12 N32760 D128) and Wan 14B 720p (B1 H40 N75600 D128), with Cq query clusters and Ck key
clusters per head, it times (CUDA events, median):
  * kmeans_assign for q (Cq) and k (Ck), with achieved TFLOP/s, and a check against the PyTorch reference;
  * kmeans_update with each method (deterministic index_put_, atomic index_add_, sort + Triton segment sums), and
    whether two runs of the deterministic ones agree bitwise;
  * one cold clustering of q and k (up to 50 iterations, stop when stable) and a 2-iteration warm-started one;
  * cluster_permutation (stable sort + offsets) of q and k labels, permute_qkv (one launch), permute_tokens x3,
    unpermute_tokens of the output, and the torch gather/scatter references;
  * a plain-torch estimate of the cluster selection (centroid scores, size-weighted softmax, sort, top-p prefix);
  * SVG2's whole overhead path as one timed block (warm q+k k-means whose sort is reused as the permutation,
    the method's selection, permute_qkv, inverse permutation of the output);
  * dense SDPA with the cuDNN backend (FlashAttention backend beside it).
The summary gives the per-layer overhead (warm q+k k-means + sorts + permutations + selection estimate) as a
fraction of dense attention; the SVG2 target is <= 15%. Inputs are synthetic clustered tokens (64 centres per
head plus noise): timings of assignment, update and permutation do not depend on the values.

    PYTHONPATH=$PWD python benchmarks/bench_kmeans.py --out benchmarks/results/kmeans.json     # H100, ~1-2 min
    ... --shapes wan1.3b_480p_81f --profile   # plus a per-kernel table of SVG2's overhead path
    python benchmarks/bench_kmeans.py --smoke --out /tmp/kmeans_smoke.json                    # CPU, seconds

Runs from a bare checkout (no install): the kernels are loaded from the repository folder if vidaccel is missing.
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

import torch

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # name: (batch, heads, tokens, head_dim)
    "wan1.3b_480p_81f": (1, 12, 32760, 128),
    "wan14b_720p_81f": (1, 40, 75600, 128),
    "wan1.3b_480p_81f_b2": (2, 12, 32760, 128),  # both CFG branches in one batch (not run by default)
    "smoke": (1, 2, 160, 32),
}


def _import_kernels():
    """vidaccel.kernels.kmeans / cluster_permute, from an installed vidaccel or straight from the repository."""
    try:
        from vidaccel.kernels import cluster_permute, kmeans
        return kmeans, cluster_permute
    except Exception:  # bare checkout on a GPU box: no install, maybe no diffusers
        pass
    for name in [n for n in sys.modules if n == "vidaccel" or n.startswith("vidaccel.")]:
        del sys.modules[name]
    for name, folder in (("vidaccel", ROOT / "vidaccel"), ("vidaccel.kernels", ROOT / "kernels")):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    return (importlib.import_module("vidaccel.kernels.kmeans"),
            importlib.import_module("vidaccel.kernels.cluster_permute"))


def time_ms(fn, *, on_gpu: bool, target_ms: float = 300.0, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median of CUDA-event timings after a warm-up call; repetitions sized to about target_ms."""
    if not on_gpu:  # CPU smoke runs (interpreter): wall clock of one call after a warm-up
        fn()
        times = []
        for _ in range(1):
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


def time_once_ms(fn, *, on_gpu: bool) -> float:
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if on_gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def clustered_tokens(B, H, N, D, dtype, device, seed, centres=64):
    """(B, N, H, D) tokens around `centres` random points per head: the attention processors' layout."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    means = torch.randn((B, H, centres, D), generator=gen, device=device)
    which = torch.randint(0, centres, (B, H, N), generator=gen, device=device)
    x = torch.gather(means, 2, which[..., None].expand(B, H, N, D))
    x.add_(torch.randn((B, H, N, D), generator=gen, device=device), alpha=0.5)
    return x.transpose(1, 2).contiguous().to(dtype)


def selection_estimate(q_centroids, k_centroids, k_sizes, top_p=0.9, min_fraction=0.01):
    """Plain-torch SVG2 cluster selection (for the overhead estimate only; the method has its own)."""
    d = q_centroids.shape[-1]
    scores = torch.matmul(q_centroids, k_centroids.transpose(-1, -2)) / math.sqrt(d)
    logits = scores + torch.log(k_sizes.float().clamp(min=1)).unsqueeze(-2)
    logits = logits.masked_fill((k_sizes == 0).unsqueeze(-2), float("-inf"))
    mass = torch.softmax(logits, dim=-1)
    sorted_mass, idx = mass.sort(dim=-1, descending=True)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass of the clusters ranked ahead
    rank = torch.arange(mass.shape[-1], device=mass.device)
    keep_sorted = (before < top_p) | (rank < max(1, int(min_fraction * mass.shape[-1])))
    selected = torch.zeros_like(keep_sorted)
    selected.scatter_(-1, idx, keep_sorted)
    return selected


def profile_kernels(fn, table_path: Path, runs: int = 5) -> list[dict]:
    """GPU time of every kernel that `fn` launches (torch.profiler), per run of fn, largest first; the full
    profiler table goes to `table_path`."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    table_path.write_text(events.table(sort_by="self_device_time_total", row_limit=40))
    rows = [{"name": e.key, "us_per_run": e.self_device_time_total / runs, "calls_per_run": e.count / runs}
            for e in events if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r["us_per_run"])


def run_shape(name, shape, args, km, cp, on_gpu, device, dtype, log):
    B, H, N, D = shape
    Cq, Ck = (8, 16) if name == "smoke" else (args.cq, args.ck)
    rec = {"shape": name, "batch": B, "heads": H, "tokens": N, "head_dim": D, "q_clusters": Cq, "k_clusters": Ck,
           "dtype": str(dtype), "times_ms": {}, "checks": {}, "errors": {}}
    t = rec["times_ms"]

    def section(key, fn):
        try:
            fn()
        except Exception as exc:  # record and move on: one failure must not lose the other numbers
            rec["errors"][key] = f"{type(exc).__name__}: {exc}"
            log(f"[{name}] {key} FAILED: {type(exc).__name__}: {exc}")
            if args.verbose:
                traceback.print_exc()
        if on_gpu:
            torch.cuda.empty_cache()

    q = clustered_tokens(B, H, N, D, dtype, device, seed=1)
    k = clustered_tokens(B, H, N, D, dtype, device, seed=2)
    v = torch.randn((B, N, H, D), device=device, dtype=dtype)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, N, D) views, as the method passes them
    state = {}

    def init():
        state["cq"] = km._random_token_init(qh, Cq, seed=0)
        state["ck"] = km._random_token_init(kh, Ck, seed=0)
    section("init", init)
    if "cq" not in state:
        return rec

    def assign():
        for tag, x, cent, C in (("q", qh, state["cq"], Cq), ("k", kh, state["ck"], Ck)):
            ms = time_ms(lambda: km.kmeans_assign(x, cent), on_gpu=on_gpu)
            t[f"assign_{tag}"] = ms
            rec[f"assign_{tag}_tflops"] = 2.0 * B * H * N * C * D / (ms * 1e-3) / 1e12
            labels = km.kmeans_assign(x, cent)
            state[f"labels_{tag}"] = labels
            # Check two heads against the float32 reference: nearest up to rounding of 16-bit centroids.
            hs = slice(0, min(2, H))
            ref = km.kmeans_assign_reference(x[:, hs], cent[:, hs])
            xs = x[:, hs].float()
            c_used = cent[:, hs].to(dtype).float()
            c_norm = c_used.square().sum(-1)

            def dist_of(lab):
                cs = torch.gather(c_used, 2, lab.long()[..., None].expand(*lab.shape, D))
                return (xs - cs).square().sum(-1)
            gap = (dist_of(labels[:, hs]) - dist_of(ref)) / (xs.square().sum(-1) + c_norm.amax(-1, keepdim=True))
            rec["checks"][f"assign_{tag}_agree_fraction"] = (labels[:, hs] == ref).float().mean().item()
            rec["checks"][f"assign_{tag}_max_relative_gap"] = gap.max().item()
            log(f"[{name}] assign {tag} C={C}: {ms:.3f} ms ({rec[f'assign_{tag}_tflops']:.0f} TFLOP/s), "
                f"agree {rec['checks'][f'assign_{tag}_agree_fraction']:.4f}, gap {gap.max().item():.2e}")
    section("assign", assign)

    def assign_variants():
        # Every tuning candidate on its own (explicit launches: includes Triton's Python dispatch per call).
        if not on_gpu:
            return
        rec["assign_variants"] = []
        for tag, x, cent, C in (("q", qh, state["cq"], Cq), ("k", kh, state["ck"], Ck)):
            tuned = state.get(f"labels_{tag}")
            for bn, bc, warps, stages in km.ASSIGN_TUNING_CANDIDATES:
                blocks = {"BLOCK_N": bn, "BLOCK_C": bc}
                call = lambda: km._assign_triton(x, cent, blocks=blocks, num_warps=warps,  # noqa: E731
                                                 num_stages=stages)
                ms = time_ms(call, on_gpu=on_gpu)
                same = bool(torch.equal(call(), tuned)) if tuned is not None else None
                rec["assign_variants"].append({"tag": tag, "clusters": C, "block_n": bn, "block_c": bc,
                                               "num_warps": warps, "num_stages": stages,
                                               "ms": ms, "labels_equal_autotuned": same})
                log(f"[{name}] assign {tag} C={C} {blocks} w{warps} s{stages}: {ms:.3f} ms, labels equal {same}")
    section("assign_variants", assign_variants)

    def update():
        for tag, x, C in (("q", qh, Cq), ("k", kh, Ck)):
            labels = state.get(f"labels_{tag}")
            if labels is None:
                labels = km.kmeans_assign(x, state[f"c{tag}"])
            prev = state[f"c{tag}"]
            results = {}
            for method in ("index_put", "index_add", "sorted"):
                try:
                    t[f"update_{tag}_{method}"] = time_ms(
                        lambda: km.kmeans_update(x, labels, C, prev, method=method), on_gpu=on_gpu)
                    results[method] = km.kmeans_update(x, labels, C, prev, method=method)
                    if method != "index_add":
                        again = km.kmeans_update(x, labels, C, prev, method=method)
                        rec["checks"][f"update_{tag}_{method}_bitwise_reproducible"] = bool(
                            torch.equal(results[method][0], again[0]))
                except Exception as exc:
                    rec["errors"][f"update_{tag}_{method}"] = f"{type(exc).__name__}: {exc}"
                    log(f"[{name}] update {tag} {method} FAILED: {type(exc).__name__}: {exc}")
            if "index_put" in results:
                base = results["index_put"]
                for method, other in results.items():
                    rec["checks"][f"update_{tag}_{method}_max_abs_diff_vs_index_put"] = \
                        (other[0] - base[0]).abs().max().item()
                    rec["checks"][f"update_{tag}_{method}_sizes_equal"] = bool(torch.equal(other[1], base[1]))
            log(f"[{name}] update {tag}: " + ", ".join(
                f"{m} {t[f'update_{tag}_{m}']:.3f} ms" for m in results) + "; checks " + str(
                {k_: v_ for k_, v_ in rec["checks"].items() if k_.startswith(f"update_{tag}")}))
    section("update", update)

    def cold():
        iters = 2 if name == "smoke" else 50
        out = {}

        def go():
            out["q"] = km.batched_kmeans(qh, Cq, iterations=iters, seed=0, stop_when_stable=True)
            out["k"] = km.batched_kmeans(kh, Ck, iterations=iters, seed=0, stop_when_stable=True)
        t["cold_qk_kmeans_once"] = time_once_ms(go, on_gpu=on_gpu)
        rec["cold_iterations"] = {"q": out["q"].iterations, "k": out["k"].iterations}
        state["cold"] = out
        inertia = {tag: km.kmeans_inertia(x, out[tag].labels, out[tag].centroids).sum().item()
                   for tag, x in (("q", qh), ("k", kh))}
        rec["cold_inertia_per_token"] = {tag: v_ / (B * H * N) for tag, v_ in inertia.items()}
        log(f"[{name}] cold q+k k-means: {t['cold_qk_kmeans_once']:.1f} ms, iterations {rec['cold_iterations']}")
    section("cold", cold)

    def warm():
        cold_out = state.get("cold") or {
            "q": km.batched_kmeans(qh, Cq, iterations=2, seed=0), "k": km.batched_kmeans(kh, Ck, iterations=2, seed=0)}
        # Next step's tokens: slightly moved.
        q2 = qh + 0.05 * torch.randn_like(qh)
        k2 = kh + 0.05 * torch.randn_like(kh)
        for method in ("index_put", "sorted"):
            out = {}

            def go():
                out["q"] = km.batched_kmeans(q2, Cq, iterations=2, init_centroids=cold_out["q"].centroids,
                                             update_method=method)
                out["k"] = km.batched_kmeans(k2, Ck, iterations=2, init_centroids=cold_out["k"].centroids,
                                             update_method=method)
            key = "warm_qk_kmeans_2iter" + ("" if method == "index_put" else f"_{method}_update")
            try:
                t[key] = time_ms(go, on_gpu=on_gpu)
            except Exception as exc:
                rec["errors"][key] = f"{type(exc).__name__}: {exc}"
                log(f"[{name}] {key} FAILED: {type(exc).__name__}: {exc}")
                continue
            state.setdefault("warm", out)
            log(f"[{name}] warm 2-iteration q+k k-means ({method} update): {t[key]:.3f} ms")
    section("warm", warm)

    def permutation():
        res = state.get("warm") or state.get("cold")
        lq = res["q"].labels if res else state["labels_q"]
        lk = res["k"].labels if res else state["labels_k"]
        t["cluster_permutation_q"] = time_ms(lambda: cp.cluster_permutation(lq, Cq), on_gpu=on_gpu)
        t["cluster_permutation_k"] = time_ms(lambda: cp.cluster_permutation(lk, Ck), on_gpu=on_gpu)
        pq, pk = cp.cluster_permutation(lq, Cq), cp.cluster_permutation(lk, Ck)
        state["pq"], state["pk"] = pq, pk

        # The labels' stable sort alone: per row (segmented), or once over the flat keys row * C + label.
        def sort_flat(labels, C):
            rows = torch.arange(B * H, device=labels.device, dtype=torch.int32).view(B, H, 1)
            keys, order = torch.sort((labels + rows * C).view(-1), stable=True)
            return keys.view(B, H, N) - rows * C, order.view(B, H, N) - rows.long() * N
        t["sort_rows_k"] = time_ms(lambda: torch.sort(lk, dim=-1, stable=True), on_gpu=on_gpu)
        t["sort_flat_k"] = time_ms(lambda: sort_flat(lk, Ck), on_gpu=on_gpu)
        rec["checks"]["sort_flat_equals_rows"] = bool(torch.equal(sort_flat(lk, Ck)[1],
                                                                  torch.sort(lk, dim=-1, stable=True)[1]))
        log(f"[{name}] label sort k: rows {t['sort_rows_k']:.3f} ms, flat {t['sort_flat_k']:.3f} ms, equal "
            f"{rec['checks']['sort_flat_equals_rows']}")
        t["permute_qkv_one_launch"] = time_ms(lambda: cp.permute_qkv(q, k, v, pq.order, pk.order), on_gpu=on_gpu)
        t["permute_tokens_x3"] = time_ms(lambda: (cp.permute_tokens(q, pq.order), cp.permute_tokens(k, pk.order),
                                                  cp.permute_tokens(v, pk.order)), on_gpu=on_gpu)
        t["permute_torch_gather_x3"] = time_ms(lambda: (cp.permute_tokens_reference(q, pq.order),
                                                        cp.permute_tokens_reference(k, pk.order),
                                                        cp.permute_tokens_reference(v, pk.order)), on_gpu=on_gpu)
        outs = cp.permute_qkv(q, k, v, pq.order, pk.order)
        refs = cp.permute_qkv_reference(q, k, v, pq.order, pk.order)
        rec["checks"]["permute_qkv_equals_reference"] = all(bool(torch.equal(a, b)) for a, b in zip(outs, refs))
        o = outs[2]  # stands in for the attention output in query cluster order
        t["unpermute_output"] = time_ms(lambda: cp.unpermute_tokens(o, pq.order), on_gpu=on_gpu)
        t["unpermute_torch_scatter"] = time_ms(lambda: cp.unpermute_tokens_reference(o, pq.order), on_gpu=on_gpu)
        back = cp.unpermute_tokens(outs[0], pq.order)
        rec["checks"]["permutation_round_trip_exact"] = bool(torch.equal(back, q))
        moved = 2 * B * N * H * D * q.element_size()
        rec["permute_qkv_GBps"] = 3 * moved / (t["permute_qkv_one_launch"] * 1e-3) / 1e9
        log(f"[{name}] sort q {t['cluster_permutation_q']:.3f} k {t['cluster_permutation_k']:.3f} ms; permute_qkv "
            f"{t['permute_qkv_one_launch']:.3f} ms ({rec['permute_qkv_GBps']:.0f} GB/s), "
            f"x3 {t['permute_tokens_x3']:.3f}, torch {t['permute_torch_gather_x3']:.3f}; "
            f"unpermute {t['unpermute_output']:.3f} ms (torch "
            f"{t['unpermute_torch_scatter']:.3f}); checks {rec['checks'].get('permute_qkv_equals_reference')} "
            f"{rec['checks'].get('permutation_round_trip_exact')}")
    section("permutation", permutation)

    def selection():
        res = state.get("warm") or state.get("cold")
        t["selection_torch_estimate"] = time_ms(
            lambda: selection_estimate(res["q"].centroids, res["k"].centroids, res["k"].sizes), on_gpu=on_gpu)
        sel = selection_estimate(res["q"].centroids, res["k"].centroids, res["k"].sizes)
        rec["selection_kept_cluster_fraction"] = sel.float().mean().item()
        log(f"[{name}] selection estimate: {t['selection_torch_estimate']:.3f} ms")
    section("selection", selection)

    def svg2_path():
        # Everything SVG2AttentionMethod.sparse_step runs besides the attention kernel, timed as one block by
        # calling the method itself with a stand-in kernel: warm q + k k-means (sorted update, whose sort is
        # reused as the permutation), the selection, permute_qkv and the output's inverse permutation.
        from vidaccel.attention.svg2 import SVG2Attention

        method = SVG2Attention(query_clusters=Cq, key_clusters=Ck, top_p=0.9, min_kept_fraction=0.01,
                               warm_iterations=args.warm_iterations).build()
        noise = 0.05 * torch.randn_like(q)
        q2, k2 = q + noise, k - noise  # (B, N, H, D), the method's layout; not the tokens clustered above

        def no_attention(qp, kp, vp, q_offsets, k_offsets, selected, return_lse=False, **orders):
            # The (permuted, or with the "indexed" key mode unpermuted) queries stand in for the output.
            return qp.clone() if orders else qp

        def go():
            step = method.sparse_step(q2, k2, v, attention_kernel=no_attention)
            return step.out, step.selected

        go()  # the generation's first (cold) call; every timed call is warm
        rec["svg2_overhead_path_warm_iterations"] = method.config.warm_iterations
        t["svg2_overhead_path"] = time_ms(go, on_gpu=on_gpu)
        log(f"[{name}] SVG2 overhead path (measured as one block): {t['svg2_overhead_path']:.3f} ms")
        if on_gpu:
            # The same block replayed as one CUDA graph: its GPU time without the ~120 kernel launches' host
            # gaps (what a step pays when the host runs ahead of the GPU, or under torch.compile's
            # reduce-overhead mode). Capturing also proves the path has no host synchronisation.
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    go()
                torch.cuda.current_stream().wait_stream(side)
                before = dict(method._centroids)  # the warm start the captured call reads
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = go()
                t["svg2_overhead_path_cuda_graph"] = time_ms(graph.replay, on_gpu=True)
                graph.replay()
                method._centroids.clear()
                method._centroids.update(before)  # the same warm start for the eager call
                eager = go()
                torch.cuda.synchronize()
                rec["checks"]["cuda_graph_matches_eager"] = bool(
                    torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1]))
                log(f"[{name}] same block as one CUDA graph: {t['svg2_overhead_path_cuda_graph']:.3f} ms "
                    f"(matches eager: {rec['checks']['cuda_graph_matches_eager']})")
            except Exception as exc:  # a host sync or an op that cannot be captured: say so, go on
                rec["svg2_overhead_path_cuda_graph_error"] = repr(exc)[:500]
                log(f"[{name}] CUDA graph capture failed: {exc!r}"[:300])
        if args.profile and on_gpu:
            rec["svg2_overhead_path_kernels"] = profile_kernels(go, Path(args.out).with_name(
                f"{Path(args.out).stem}_{name}_profile.txt"))
            log(f"[{name}] profiled: " + ", ".join(f"{r['name'][:40]} {r['us_per_run']:.0f} us"
                                                  for r in rec["svg2_overhead_path_kernels"][:8]))
    section("svg2_path", svg2_path)

    def dense():
        if not on_gpu:
            t["dense_sdpa_math_cpu"] = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), on_gpu=False)
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qd, kd, vd = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        for label, backend in (("dense_sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("dense_sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    t[label] = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd),
                                       on_gpu=True, target_ms=1000.0, max_reps=20)
                log(f"[{name}] {label}: {t[label]:.2f} ms")
            except Exception as exc:
                rec["errors"][label] = f"{type(exc).__name__}: {exc}"
                log(f"[{name}] {label} FAILED: {exc}")
    section("dense", dense)

    parts = ["warm_qk_kmeans_2iter", "cluster_permutation_q", "cluster_permutation_k", "permute_qkv_one_launch",
             "unpermute_output", "selection_torch_estimate"]
    dense_ms = t.get("dense_sdpa_cudnn") or t.get("dense_sdpa_flash") or t.get("dense_sdpa_math_cpu")
    if dense_ms and all(p in t for p in parts):
        overhead = sum(t[p] for p in parts)
        rec["overhead_ms"] = overhead
        rec["overhead_fraction_of_dense"] = overhead / dense_ms
        rec["overhead_parts"] = parts
        log(f"[{name}] per-layer SVG2 overhead {overhead:.2f} ms = {100 * overhead / dense_ms:.1f}% of dense "
            f"{dense_ms:.2f} ms (target <= 15%)")
        if "warm_qk_kmeans_2iter_sorted_update" in t:
            alt = overhead - t["warm_qk_kmeans_2iter"] + t["warm_qk_kmeans_2iter_sorted_update"]
            rec["overhead_fraction_of_dense_sorted_update"] = alt / dense_ms
            log(f"[{name}] with the sorted update: {alt:.2f} ms = {100 * alt / dense_ms:.1f}% of dense")
    if dense_ms and "svg2_overhead_path" in t:
        rec["svg2_overhead_path_fraction_of_dense"] = t["svg2_overhead_path"] / dense_ms
        log(f"[{name}] SVG2 overhead path measured: {t['svg2_overhead_path']:.2f} ms = "
            f"{100 * t['svg2_overhead_path'] / dense_ms:.1f}% of dense (target <= 15%)")
    if dense_ms and "svg2_overhead_path_cuda_graph" in t:
        rec["svg2_overhead_path_cuda_graph_fraction_of_dense"] = t["svg2_overhead_path_cuda_graph"] / dense_ms
        log(f"[{name}] as one CUDA graph: {t['svg2_overhead_path_cuda_graph']:.2f} ms = "
            f"{100 * t['svg2_overhead_path_cuda_graph'] / dense_ms:.1f}% of dense")
    return rec


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter) in seconds")
    parser.add_argument("--shapes", default="wan1.3b_480p_81f,wan14b_720p_81f")
    parser.add_argument("--cq", type=int, default=200, help="query clusters per head")
    parser.add_argument("--ck", type=int, default=1000, help="key clusters per head")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed sections")
    parser.add_argument("--warm-iterations", type=int, default=2,
                        help="warm k-means iterations of the SVG2 overhead path (the method's default: 2)")
    parser.add_argument("--key-mode", default=None, choices=("packed", "indexed", "ranges"),
                        help="the variable-block kernel's key mode in the SVG2 overhead path (\"indexed\" gathers "
                             "through the cluster orders, so the path has no permutations)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile SVG2's overhead path kernel by kernel (table beside --out)")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        if not args.smoke:
            sys.exit("bench_kmeans needs a CUDA GPU (or --smoke for a CPU test of this script)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    km, cp = _import_kernels()
    if args.key_mode is not None:
        importlib.import_module("vidaccel.kernels.varblock_attention").DEFAULT_KEY_MODE = args.key_mode
    device = "cuda" if on_gpu else "cpu"
    # The Triton interpreter is wrong for bfloat16: smoke runs use float16.
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float16
    shapes = ["smoke"] if args.smoke else [s.strip() for s in args.shapes.split(",") if s.strip()]

    started = time.time()
    log_lines = []

    def log(msg):
        line = f"{time.time() - started:7.1f}s {msg}"
        print(line, flush=True)
        log_lines.append(line)

    result = {
        "benchmark": "bench_kmeans",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu (smoke, Triton interpreter)",
        "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "smoke": bool(args.smoke),
        "key_mode": args.key_mode,
        "records": [],
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for name in shapes:
        if name not in SHAPES:
            result["records"].append({"shape": name, "errors": {"shape": f"unknown; choose from {list(SHAPES)}"}})
            continue
        try:
            result["records"].append(run_shape(name, SHAPES[name], args, km, cp, on_gpu, device, dtype, log))
        except Exception as exc:
            result["records"].append({"shape": name, "errors": {"shape": f"{type(exc).__name__}: {exc}"}})
            log(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
        if on_gpu:
            torch.cuda.empty_cache()
        result["wall_s"] = time.time() - started
        result["log"] = log_lines
        out_path.write_text(json.dumps(result, indent=1))  # after every shape: a later crash keeps the numbers
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
