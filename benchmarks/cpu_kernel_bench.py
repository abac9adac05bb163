#!/usr/bin/env python
"""The decoder's linear layers on a CPU: dense oneDNN against low-rank oneDNN and the fused kernel.

    .venv/bin/python -m benchmarks.cpu_kernel_bench                    # SmolLM2-135M shapes, ratio 0.5
    .venv/bin/python -m benchmarks.cpu_kernel_bench --ratio 0.3 --tokens 1,8,128
    .venv/bin/python -m benchmarks.cpu_kernel_bench --parts --tokens 1,2,4,8,16,32,64,128 --name parts

One forward through the linear layers of every decoder layer of SmolLM2-135M (30 x fused qkv,
o, fused gate_up, down: 425 MB of float32 weights, far more than the caches, as in a real step),
for each token count, three ways, side by side in one process (timed in turns, see
``benchmarks.measure.time_ms_interleaved``):

  dense           vLLM's dense CPU path: each weight prepacked once for oneDNN (``onednn_mm``)
  onednn_lowrank  the low-rank factors each prepacked for oneDNN: one shrink, one expand per
                  segment, a concatenation (soco-serve's CPU path before the fused kernel)
  soco_kernel     ``kernels.cpu_lowrank``: one call per layer (what soco-serve runs now)
  soco_kernel_parts  (with ``--parts``) the same factors, the fused layers' ``V`` in two parts:
                  the first segment's rows (q, gate) packed on their own, as a layer holds a
                  shared basis beside its own rows; same bytes, so this isolates the parts' cost

Ranks follow ``--ratio`` as in svd-llm (each matrix keeps ``1 - ratio`` of its parameters;
fused layers keep one rank per segment). Reported: median milliseconds per forward of the whole
stack and the speed-up over dense. Needs vLLM (its oneDNN ops).

Writes benchmarks/results/cpu_kernel_<device-slug>.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from kernels import cpu_lowrank  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    DEFAULT_RESULTS_DIR,
    environment,
    lowrank_for_ratio,
    parse_ints,
    time_ms_interleaved,
    write_results,
)

# SmolLM2-135M's decoder linears, as vLLM fuses them: (in, [out per segment]).
LAYER = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])]


def build(layers: int, ratio: float, parts: bool):
    """The dense stack (oneDNN handlers), and the low-rank one both ways (three with ``parts``)."""
    from vllm import _custom_ops as ops

    dense, onednn, kernel, kernel_parts = [], [], [], []
    for _ in range(layers):
        for in_features, outs in LAYER:
            dense.append(ops.create_onednn_mm(torch.randn(sum(outs), in_features).t(), 32))
            w = lowrank_for_ratio(in_features, outs, ratio, dtype=torch.float32, device="cpu")
            us = w.packed.unpack()
            onednn.append((ops.create_onednn_mm(w.v_cat.t(), 32), [ops.create_onednn_mm(u.t(), 32) for u in us], w))
            kernel.append(cpu_lowrank.CpuLowRank.build(cpu_lowrank.pack_panels(w.v_cat), in_features, us, w.ranks))
            if parts:
                split = [w.ranks[0], sum(w.ranks[1:])] if len(outs) > 1 else [sum(w.ranks)]
                panels = [cpu_lowrank.pack_panels(v) for v in w.v_cat.split(split)]
                kernel_parts.append(cpu_lowrank.CpuLowRank.build(panels, in_features, us, w.ranks))
    return dense, onednn, kernel, kernel_parts


def onednn_lowrank(ops, layer, x: torch.Tensor) -> torch.Tensor:
    shrink, expands, w = layer
    h = ops.onednn_mm(shrink, x, None)
    blocks = [ops.onednn_mm(e, h[:, s.rank_offset : s.rank_offset + s.rank], None)
              for e, s in zip(expands, w.packed.segments)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.5, help="compression ratio of every matrix (default 0.5)")
    p.add_argument("--tokens", type=parse_ints, default=parse_ints("1,2,4,8,16,32,64,128,512,2048"))
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--reps", type=int, default=15, help="timed forwards per cell (median)")
    p.add_argument("--parts", action="store_true", help="also time soco_kernel_parts (see above)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    p.add_argument("--name", help="result file stem: cpu_kernel_<name>_<device> (default cpu_kernel_<device>)")
    a = p.parse_args(argv)
    from vllm import _custom_ops as ops

    if not cpu_lowrank.available():
        raise SystemExit("the CPU low-rank kernel could not be built here")
    cpu = torch.device("cpu")
    dense, onednn, kernel, kernel_parts = build(a.layers, a.ratio, a.parts)
    rows = []
    print(f"{'tokens':>6} {'dense ms':>9} {'onednn_lowrank':>15} {'soco_kernel':>12}"
          f"{' soco_kernel_parts' if a.parts else ''}   (speed-up over dense)")
    for m in a.tokens:
        xs = {576: torch.randn(m, 576), 1536: torch.randn(m, 1536)}
        calls = {
            "dense": lambda: [ops.onednn_mm(h, xs[h.k], None) for h in dense],
            "onednn_lowrank": lambda: [onednn_lowrank(ops, layer, xs[layer[2].v_cat.shape[1]]) for layer in onednn],
            "soco_kernel": lambda: [k(xs[k.in_features]) for k in kernel],
        }
        if a.parts:
            calls["soco_kernel_parts"] = lambda: [k(xs[k.in_features]) for k in kernel_parts]
        ms = time_ms_interleaved(calls, reps=a.reps)
        row = {"tokens": m, "ms": {k: round(v, 3) for k, v in ms.items()},
               "speedup_vs_dense": {k: round(ms["dense"] / v, 3) for k, v in ms.items()}}
        rows.append(row)
        s = row["speedup_vs_dense"]
        print(f"{m:6d} {ms['dense']:9.2f} {ms['onednn_lowrank']:9.2f} ({s['onednn_lowrank']:.2f}x)"
              f" {ms['soco_kernel']:7.2f} ({s['soco_kernel']:.2f}x)"
              + (f" {ms['soco_kernel_parts']:7.2f} ({s['soco_kernel_parts']:.2f}x)" if a.parts else ""), flush=True)
    dense_bytes = sum(in_f * sum(outs) for in_f, outs in LAYER) * a.layers * 4
    low_bytes = sum(lowrank_for_ratio(i, o, a.ratio, dtype=torch.float32, device="meta").nbytes() for i, o in LAYER)
    payload = {"environment": {**environment(cpu), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                               "isa": torch.backends.cpu.get_cpu_capability()},
               "timing": f"median of {a.reps} rounds, one call of each column per round, order rotated",
               "ratio": a.ratio, "layers": a.layers, "weight_bytes": {"dense": dense_bytes,
                                                                     "lowrank": low_bytes * a.layers},
               "rows": rows}
    stem = f"cpu_kernel_{a.name}" if a.name else "cpu_kernel"
    paths = write_results(stem, payload, a.out_dir, figure=plot(rows, payload))
    print("wrote", *paths)
    return 0


def plot(rows: list[dict], payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    tokens = [r["tokens"] for r in rows]
    for key, style in (("onednn_lowrank", "--o"), ("soco_kernel", "-o"), ("soco_kernel_parts", ":s")):
        if key in rows[0]["speedup_vs_dense"]:
            ax.plot(tokens, [r["speedup_vs_dense"][key] for r in rows], style, label=key)
    ideal = payload["weight_bytes"]["dense"] / payload["weight_bytes"]["lowrank"]
    ax.axhline(ideal, color="gray", ls=":", label=f"bytes ratio {ideal:.2f}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("speed-up over dense oneDNN")
    ax.set_title(f"{payload['layers']} SmolLM2 decoder layers, ratio {payload['ratio']}, "
                 f"{payload['environment']['device']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


if __name__ == "__main__":
    sys.exit(main())
