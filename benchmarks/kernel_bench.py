#!/usr/bin/env python
"""Time one low-rank linear layer against its dense equivalent, per shape, compression ratio and token count.

Shapes are the decoder linears of SmolLM2-135M (hidden 576, q/o 576x576, k/v 192x576,
gate/up 1536x576, down 576x1536, and vLLM's fused qkv and gate_up) and of a 7B Llama (hidden
4096, intermediate 11008). Each matrix of compression ratio ``c`` gets the rank
``floor(in*out*(1-c)/(in+out))`` (same parameter count as ``c`` of the dense matrix removed).

Methods (random weights; the time does not depend on the values):

  dense             torch.mm(x, W.t())                      one GEMM with the dense weight
  torch             kernels.lowrank_forward_torch           shrink GEMM + one GEMM per segment
  triton_fused      kernels.triton_lowrank, mode "fused"    one launch, h recomputed per tile (CUDA)
  triton_two_phase  kernels.triton_lowrank, "two_phase"     cuBLAS shrink + one expand launch (CUDA)
  dispatched        kernels.lowrank_forward                 what serving runs (picks one of the above)
  dispatched_parts  the same, V in two parts                fused shapes: the first segment's rows in a
                                                            tensor of their own (a shared q or gate basis
                                                            beside the layer's own rows), so two-phase on CUDA

Reported per row: median time (CUDA: triton.testing.do_bench, L2 flushed before each call, or
the CUDA-graph timer with --cuda-graph; CPU: a simple median timer), achieved bandwidth = bytes
the method must move (weights + x + y, each read/written once) / time, its share of --peak-gbps,
speedup over dense, and the ideal speedup = dense bytes / low-rank bytes (what a purely
memory-bound kernel would reach).

Use the results to set kernels.ops.TRITON_MAX_TOKENS (where `torch` overtakes the best
Triton column) and kernels.triton_lowrank.FUSED_REREAD_BUDGET_BYTES (where `triton_two_phase`
overtakes `triton_fused`); both were chosen without a GPU.

Writes benchmarks/results/kernel_bench_<device-slug>.json and .png (speedup of `dispatched`
vs tokens, one panel per shape, dashed = ideal).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


from kernels import lowrank_forward, lowrank_forward_torch  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    LowRankWeights,
    add_common_args,
    environment,
    lowrank_for_ratio,
    parse_ints,
    resolve_common_args,
    run_config,
    time_ms,
    write_results,
)


@dataclass(frozen=True)
class LinearShape:
    """One (possibly fused) linear layer: shared input size, one output size per segment."""

    model: str
    name: str
    in_features: int
    outs: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.model} {self.name} {self.in_features}->{'+'.join(map(str, self.outs))}"


def model_shapes(model: str, hidden: int, kv: int, intermediate: int) -> list[LinearShape]:
    """The distinct linear shapes of a Llama decoder layer (q and o share a shape, as do k/v and gate/up)."""
    return [
        LinearShape(model, "q/o", hidden, (hidden,)),
        LinearShape(model, "k/v", hidden, (kv,)),
        LinearShape(model, "gate/up", hidden, (intermediate,)),
        LinearShape(model, "down", intermediate, (hidden,)),
        LinearShape(model, "qkv", hidden, (hidden, kv, kv)),
        LinearShape(model, "gate_up", hidden, (intermediate, intermediate)),
    ]


MODELS = {
    "smollm2-135m": model_shapes("smollm2-135m", hidden=576, kv=192, intermediate=1536),
    "llama-7b": model_shapes("llama-7b", hidden=4096, kv=4096, intermediate=11008),
}
QUICK_SHAPES = ("q/o", "qkv")


def methods(
    weights: LowRankWeights, dense: torch.Tensor, x: torch.Tensor, triton_ok: bool
) -> dict[str, Callable[[], object]]:
    """The calls to time for one (shape, ratio, token count); ``triton_ok`` adds the Triton modes."""
    v, packed = weights.v_cat, weights.packed
    calls: dict[str, Callable[[], object]] = {
        "dense": lambda: torch.mm(x, dense.t()),
        "torch": lambda: lowrank_forward_torch(x, v, packed),
    }
    if triton_ok:
        from kernels import triton_lowrank

        calls["triton_fused"] = lambda: triton_lowrank.launch(x, v, packed, mode="fused")
        calls["triton_two_phase"] = lambda: triton_lowrank.launch(x, v, packed, mode="two_phase")
    calls["dispatched"] = lambda: lowrank_forward(x, v, packed)
    if packed.num_segments > 1:
        first = packed.segments[0].rank
        parts = (v[:first], v[first:])
        calls["dispatched_parts"] = lambda: lowrank_forward(x, parts, packed)
    return calls


def bench_shape(shape: LinearShape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    dense = torch.randn(sum(shape.outs), shape.in_features, device=device, dtype=dtype) / shape.in_features**0.5
    elt = dense.element_size()
    for ratio in args.ratios:
        weights = lowrank_for_ratio(
            shape.in_features, shape.outs, ratio, dtype=dtype, device=device, rank_align=args.rank_align
        )
        for tokens in args.tokens:
            x = torch.randn(tokens, shape.in_features, device=device, dtype=dtype)
            io_bytes = tokens * (shape.in_features + sum(shape.outs)) * elt
            dense_bytes, lowrank_bytes = dense.numel() * elt + io_bytes, weights.nbytes() + io_bytes
            triton_ok = device.type == "cuda" and tokens <= args.triton_max_tokens
            dense_ms = None
            for method, fn in methods(weights, dense, x, triton_ok).items():
                ms = _time(fn, device, args)
                dense_ms = ms if method == "dense" else dense_ms
                nbytes = dense_bytes if method == "dense" else lowrank_bytes
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(
                    {
                        **asdict(shape), "label": shape.label, "ratio": ratio, "ranks": weights.ranks,
                        "tokens": tokens, "method": method, "time_us": ms * 1e3, "bytes": nbytes,
                        "gbps": gbps, "pct_peak": 100 * gbps / args.peak_gbps,
                        "speedup_vs_dense": dense_ms / ms, "ideal_speedup": dense_bytes / lowrank_bytes,
                    }
                )  # fmt: skip
                _print_row(rows[-1])
    return rows


def _time(fn: Callable[[], object], device: torch.device, args: argparse.Namespace) -> float:
    if device.type == "cuda" and args.cuda_graph:
        import triton.testing

        fn()  # compile outside the capture
        return float(triton.testing.do_bench_cudagraph(fn, return_mode="median"))
    return time_ms(fn, device, cpu_reps=args.cpu_reps)


def _print_row(row: dict) -> None:
    print(
        f"{row['label']:<38} c={row['ratio']:.1f} r={','.join(map(str, row['ranks'])):<14} T={row['tokens']:<5} "
        f"{row['method']:<17} {row['time_us']:>10.1f} us {row['gbps']:>8.1f} GB/s {row['pct_peak']:>5.1f}% "
        f"x{row['speedup_vs_dense']:.2f} (ideal x{row['ideal_speedup']:.2f})",
        flush=True,
    )


def plot(rows: list[dict], title: str):
    """Speedup of the dispatched path vs dense over tokens, one panel per shape, one colour per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows})
    cols = min(3, len(labels))
    rows_n = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        for i, ratio in enumerate(ratios):
            sel = [r for r in rows if r["label"] == label and r["ratio"] == ratio and r["method"] == "dispatched"]
            tokens = [r["tokens"] for r in sel]
            ax.plot(tokens, [r["speedup_vs_dense"] for r in sel], "o-", color=f"C{i}", label=f"c={ratio:.1f}")
            ax.plot(tokens, [r["ideal_speedup"] for r in sel], "--", color=f"C{i}", alpha=0.6)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speedup vs dense")
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title + "  (solid: lowrank_forward, dashed: ideal = dense bytes / low-rank bytes)", fontsize=10)
    fig.tight_layout()
    return fig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add = parser.add_argument
    add("--models", help=f"comma-separated, from {list(MODELS)} (default all)")
    add("--shapes", help="comma-separated shape names to keep (q/o, k/v, gate/up, down, qkv, gate_up; default all)")
    add("--tokens", type=parse_ints, help="token counts (default 1,4,16,64,256,2048 on CUDA, 1,4,16,64 on CPU)")
    add("--triton-max-tokens", type=int, default=256, help="time the Triton modes up to this token count (default 256)")
    add(
        "--peak-gbps", type=float, default=3350.0,
        help="device memory bandwidth for the %%-of-peak column (default 3350: H100 SXM HBM3)",
    )  # fmt: skip
    add(
        "--cuda-graph", action="store_true",
        help="CUDA: time with triton.testing.do_bench_cudagraph (no launch overhead, L2 not flushed) instead of do_bench",
    )  # fmt: skip
    add("--cpu-reps", type=int, default=20, help="CPU: timed calls per measurement (default 20)")
    add("--quick", action="store_true", help=f"smoke run defaults: SmolLM2 {', '.join(QUICK_SHAPES)}; ratios 0.2,0.5; tokens 1,4,16")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    resolve_common_args(
        parser, args,
        {
            "models": ("smollm2-135m", ",".join(MODELS)),
            "shapes": (",".join(QUICK_SHAPES), ",".join(s.name for s in MODELS["smollm2-135m"])),
            "tokens": ([1, 4, 16], [1, 4, 16, 64, 256, 2048] if cuda else [1, 4, 16, 64]),
        },
    )  # fmt: skip
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    keep = set(args.shapes.split(","))
    shapes = [s for m in args.models.split(",") for s in MODELS[m] if s.name in keep]
    env = environment(args.device)
    print(f"# {env['device']}, {args.dtype}, torch {env['torch']}, triton {env['triton']}")
    rows = [row for shape in shapes for row in bench_shape(shape, args, args.device, args.dtype)]
    payload = {"environment": env, "config": run_config(args), "results": rows}
    figure = None if args.no_plot else plot(rows, f"{env['device']}, {str(args.dtype).removeprefix('torch.')}")
    for path in write_results("kernel_bench", payload, args.out_dir, figure):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
