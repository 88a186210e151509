"""The block-sparse kernel on the Radial layout and on variants of it of the same size, against cuDNN, same run.

Is the Radial layout slower per visited block than other layouts of its size (its sink range pass, its uneven rows,
its locality)? This times, per shape and per tile configuration, in one run:
  * ``radial``: the shipped plan (layout blocks + the first-frame sink as an exact dense key range);
  * ``radial_sink_blocks``: the sink as whole layout blocks (the key blocks touching frame 0, as the authors'
    block-quantised mask keeps it) and no range pass (shapes with a sink; elsewhere the plan's layout as it is);
  * ``shuffled``: per query block, the same number of key blocks as ``radial_sink_blocks`` at random columns
    (same work and row imbalance, no locality);
  * ``uniform``: every query block the mean count of ``radial_sink_blocks`` at random columns (no imbalance);
  * ``uniform_0.30``: every query block 30% of the key blocks at random columns (the kernel at ~30% density);
  * full density,
against cuDNN dense SDPA, re-timed right after every row (the card's clocks drift within a run). JSON records carry
the usual fields. Answer on an H200 (RESULTS.md, 2026-12-06): no; every layout runs at 0.90-0.93 of cuDNN's rate per
visited pair. ``--index-prefetch both`` also times each tile with the next block index read one tile ahead, and
``--rounds`` repeats everything interleaved (RESULTS.md, "Attention kernel with the next-index prefetch").

    python benchmarks/bench_radial_layout_variants.py --out results/radial_layout_variants_2026-12-06.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention_kernel import SHAPES, _import_project, time_ms  # noqa: E402


def _with_sink_blocks(bsa, plan):
    """The plan's layout with every key block that touches the sink frame visited by every query block."""
    layout, tl = plan.layout, plan.token_layout
    if not plan.attention_sink:
        return layout
    first, last = tl.video_start // layout.block_n, -(-(tl.video_start + tl.tokens_per_frame) // layout.block_n)
    mask = layout.block_mask().clone()
    mask[..., first:last] = True
    return bsa.BlockLayout.from_block_mask(mask, layout.block_m, layout.block_n, q_len=layout.q_len,
                                           kv_len=layout.kv_len)


def _random_layout(bsa, counts, layout, generator):
    """Per query block `counts[i]` distinct random key blocks."""
    nk = layout.num_kv_blocks
    scores = torch.rand(counts.shape[0], nk, generator=generator, device=counts.device)
    ranks = scores.argsort(-1).argsort(-1)
    mask = ranks < counts[:, None]
    return bsa.BlockLayout.from_block_mask(mask.unsqueeze(0), layout.block_m, layout.block_n, q_len=layout.q_len,
                                           kv_len=layout.kv_len)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="wan1.3b_480p_81f,wan14b_720p_81f")
    parser.add_argument("--budget-s", type=float, default=1e9)
    parser.add_argument("--variants", default=None, help="comma list of variants to time (default: all)")
    parser.add_argument("--index-prefetch", choices=("off", "on", "both"), default="off",
                        help="time the explicit tile configs without / with / both ways of reading the next layout "
                             "block index one tile ahead (KernelConfig.prefetch_index)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every (variant, config) this many times, rounds interleaved (clock drift shows)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    bsa, radial = _import_project()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t0 = time.time()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    records, lines = [], []

    def log(msg):
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        lines.append(line)

    def save():
        out_path.write_text(json.dumps(records, indent=1))
        out_path.with_suffix(".log").write_text("\n".join(lines) + "\n")

    # the TMA tiles of the autotune list, each without and/or with the index prefetch (deduplicated)
    base_configs = list(dict.fromkeys(dataclasses.replace(c, prefetch_index=False)
                                      for c in bsa._TUNING_CANDIDATES if c.use_tma and c.block_m == 128))
    prefetch = {"off": (False,), "on": (True,), "both": (False, True)}[args.index_prefetch]
    configs = [dataclasses.replace(c, prefetch_index=p) for c in base_configs for p in prefetch]
    for name in args.shapes.split(","):
        if time.time() - t0 > args.budget_s:
            log(f"budget reached, skipping {name}")
            continue
        B, H, D, grid, text, text_pos, sink = SHAPES[name]
        token_layout = radial.TokenLayout(*grid, text_tokens=text, text_position=text_pos)
        S = token_layout.total_tokens
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        shape = {"name": name, "batch": B, "heads": H, "tokens": S, "head_dim": D, "dtype": "bfloat16",
                 "grid": list(grid)}
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        log(f"{name}: cuDNN {cudnn_ms:.3f} ms")
        plan = radial.radial_block_layout(token_layout, attention_sink=sink, device="cuda")
        sink_layout = _with_sink_blocks(bsa, plan)
        gen = torch.Generator(device="cuda").manual_seed(0)
        counts = sink_layout.kv_block_counts[0].long()
        uniform = torch.full_like(counts, int(round(float(counts.float().mean()))))
        variants = {
            "full": (bsa.BlockLayout.dense(S, S, 128, device="cuda"), ()),
            "radial": (plan.layout, plan.dense_kv_ranges),
            "radial_sink_blocks": (sink_layout, () if plan.attention_sink else plan.dense_kv_ranges),
            "shuffled": (_random_layout(bsa, counts, sink_layout, gen), ()),
            "uniform": (_random_layout(bsa, uniform, sink_layout, gen), ()),
            "uniform_0.30": (_random_layout(bsa, torch.full_like(counts, round(0.30 * sink_layout.num_kv_blocks)),
                                            sink_layout, gen), ()),
        }
        runs = [(rnd, variant, cfg) for rnd in range(args.rounds) for variant in variants for cfg in [None, *configs]
                if not args.variants or variant in args.variants.split(",")]
        for rnd, variant, cfg in runs:
            layout, ranges = variants[variant]
            if time.time() - t0 > args.budget_s:
                break
            density = layout.effective_density(ranges)
            per_row = layout.kv_block_counts.float()
            if cfg is None:
                call = lambda: bsa.block_sparse_attention(q, k, v, layout, dense_kv_ranges=ranges)  # noqa: E731
            else:
                call = lambda: bsa._forward(q, k, v, layout, "bhsd", ranges, config=cfg)  # noqa: E731
            try:
                ms = time_ms(call, target_ms=500)
            except Exception as exc:  # noqa: BLE001
                log(f"{name} {variant} {cfg} failed: {exc!r}"[:400])
                continue
            # cuDNN again right after each row: the card's clocks drift over a run (an H100 ran cuDNN 4% slower
            # at the end of one), so every ratio uses the baseline timed next to it
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                base_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), target_ms=300)
            rec = {"benchmark": "radial_layout_variants", "method": f"vidaccel_block_sparse:{variant}",
                   "date": date, "device": device_name, "shape": shape, "density": round(density, 5),
                   "baseline": "sdpa_cudnn_dense, timed right after the row", "baseline_ms": round(base_ms, 4),
                   "baseline_first_ms": round(cudnn_ms, 4),
                   "method_ms": round(ms, 4), "speedup": round(base_ms / ms, 4),
                   "efficiency_vs_ideal": round(base_ms * density / ms, 4),
                   "config": "autotuned" if cfg is None else dataclasses.asdict(cfg), "round": rnd,
                   "blocks_per_row": {"mean": round(float(per_row.mean()), 2), "min": int(per_row.min()),
                                      "max": int(per_row.max())}}
            records.append(rec)
            save()
            log(f"{name} {variant:19s} density {density:.4f} {ms:8.3f} ms  {base_ms / ms:5.2f}x of cuDNN "
                f"{base_ms:.3f} ms (ideal-fraction {base_ms * density / ms:.3f})  {rec['config']}")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_end_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        log(f"{name}: cuDNN again after the variants {cudnn_end_ms:.3f} ms (first {cudnn_ms:.3f} ms)")
        del q, k, v
        torch.cuda.empty_cache()
    save()
    log("done")


if __name__ == "__main__":
    main()
