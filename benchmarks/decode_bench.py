#!/usr/bin/env python
"""End-to-end decode throughput of a Llama-shaped decoder, dense vs low-rank, without vLLM.

A minimal self-contained decoder in plain PyTorch (RMSNorm, rotary embeddings, grouped-query
attention over a static KV cache, SiLU MLP, tied LM head; random weights) at the shapes of
SmolLM2-135M (30 layers, hidden 576, 9/3 heads, head_dim 64, intermediate 1536, vocab 49152)
and of a 7B Llama (32 layers, hidden 4096, 32 heads, intermediate 11008, vocab 32000; fewer
layers with --llama-layers). The dense model uses vLLM's fused layout (one qkv and one gate_up
GEMM); the low-rank models replace every decoder linear by kernels.lowrank_forward with fused
qkv and gate_up, each matrix at the rank floor(in*out*(1-c)/(in+out)) for compression ratio c.
Embeddings, norms, attention and the LM head stay dense, as in the compressed checkpoints.

One decode step = one token for each of --batch-sizes sequences: embed, all layers, LM head,
greedy argmax fed back as the next input. On CUDA the step is captured in a CUDA graph (as
vLLM serves) and replayed --steps times; reported: tokens/s = batch * steps / time, and the
ratio to the dense model. The position is fixed and attention always spans the whole static
cache of --context slots (masked), so every step costs the same.

Writes benchmarks/results/decode_bench_<device-slug>.json and .png. On CPU, --quick runs a tiny
model eagerly (no CUDA graphs) as a smoke test; CPU numbers are not meaningful.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


from kernels import check_inputs, lowrank_forward  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    add_common_args,
    environment,
    lowrank_for_ratio,
    parse_ints,
    resolve_common_args,
    run_config,
    write_results,
)
from kernels.ops import decode_backend  # noqa: E402
from kernels.segments import PackedExpand, ShrinkFactors, shrink_parts  # noqa: E402
from kernels.torch_lowrank import forward_2d  # noqa: E402


def lowrank_silu_mul(
    x: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up low-rank layer: ``x [..., in] -> [..., intermediate]``.

    ``packed`` must have two segments of equal size (gate, then up), as vLLM's
    ``MergedColumnParallelLinear`` lays them out. Small CUDA batches fuse the activation into the
    Triton expand kernel (the gate/up output never reaches memory); otherwise the activation
    follows the torch path. Only this benchmark asks for it: in vLLM the activation is its own
    layer, so serving has no use for the fused form. The choice is a Python branch (this model
    is not traced by torch.compile; a CUDA graph captures the branch its batch size takes).
    """
    check_inputs(x, v_cat, packed, bias)
    packed.segments.check_gated()
    x2d = x.reshape(-1, x.shape[-1])
    parts = shrink_parts(v_cat)
    backend = decode_backend(x2d, packed)
    if backend is not None:
        y = backend.launch(x2d, parts, packed, bias, gated=True)
    else:
        gate, up = forward_2d(x2d, parts, packed, bias).split(packed.segments[0].out_size, dim=-1)
        y = F.silu(gate).mul_(up)
    return y.view(*x.shape[:-1], y.shape[-1])


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0


PRESETS = {
    "smollm2-135m": DecoderShape(30, 576, 9, 3, 64, 1536, 49152, rope_theta=100000.0),
    "llama-7b": DecoderShape(32, 4096, 32, 32, 128, 11008, 32000),
    "tiny": DecoderShape(2, 64, 4, 2, 16, 128, 256),
}


@dataclass(frozen=True)
class Build:
    """How to build the linears: dense (ratio None) or low-rank at ``ratio``."""

    ratio: float | None
    dtype: torch.dtype
    device: torch.device
    rank_align: int = 1
    fuse_act: bool = False

    @property
    def name(self) -> str:
        return "dense" if self.ratio is None else f"lowrank c={self.ratio:.1f}"


class Linear(nn.Module):
    """A (possibly fused) decoder linear, ``[B, in] -> [B, sum(outs)]``: dense weight or low-rank factors."""

    def __init__(self, in_features: int, outs: tuple[int, ...], build: Build) -> None:
        super().__init__()
        if build.ratio is None:
            weight = torch.randn(sum(outs), in_features, device=build.device, dtype=build.dtype) / in_features**0.5
            self.register_buffer("weight", weight)
            self.lowrank = None
        else:
            self.lowrank = lowrank_for_ratio(
                in_features, outs, build.ratio, dtype=build.dtype, device=build.device, rank_align=build.rank_align
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lowrank is None:
            return F.linear(x, self.weight)
        return lowrank_forward(x, self.lowrank.v_cat, self.lowrank.packed)

    def silu_mul(self, x: torch.Tensor, fuse: bool) -> torch.Tensor:
        """``silu(gate) * up`` for a gate_up layer; ``fuse`` puts the activation in the low-rank expand kernel."""
        if fuse and self.lowrank is not None:
            return lowrank_silu_mul(x, self.lowrank.v_cat, self.lowrank.packed)
        gate, up = self(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() if self.lowrank is None else self.lowrank.nbytes()


class Attention(nn.Module):
    def __init__(self, shape: DecoderShape, build: Build, batch: int, context: int) -> None:
        super().__init__()
        self.shape = shape
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        self.qkv = Linear(shape.hidden, (q, kv, kv), build)
        self.o = Linear(q, (shape.hidden,), build)
        cache = torch.zeros(batch, shape.kv_heads, context, shape.head_dim, device=build.device, dtype=build.dtype)
        self.register_buffer("k_cache", cache)
        self.register_buffer("v_cache", cache.clone())

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        s, batch = self.shape, x.shape[0]
        kv = s.kv_heads * s.head_dim
        q, k, v = self.qkv(x).split([s.heads * s.head_dim, kv, kv], dim=-1)
        q = _rotary(q.view(batch, s.heads, 1, s.head_dim), cos, sin)
        k = _rotary(k.view(batch, s.kv_heads, 1, s.head_dim), cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v.view(batch, s.kv_heads, 1, s.head_dim))
        out = F.scaled_dot_product_attention(
            q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=s.heads != s.kv_heads
        )
        return self.o(out.reshape(batch, s.heads * s.head_dim))


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, shape: DecoderShape, build: Build, batch: int, context: int) -> None:
        super().__init__()
        self.attn = Attention(shape, build, batch, context)
        self.gate_up = Linear(shape.hidden, (shape.intermediate, shape.intermediate), build)
        self.down = Linear(shape.intermediate, (shape.hidden,), build)
        self.fuse_act = build.fuse_act
        self.register_buffer("norm1", torch.ones(shape.hidden, device=build.device, dtype=build.dtype))
        self.register_buffer("norm2", torch.ones(shape.hidden, device=build.device, dtype=build.dtype))

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(F.rms_norm(x, x.shape[-1:], self.norm1, 1e-5), pos, cos, sin, mask)
        h = F.rms_norm(x, x.shape[-1:], self.norm2, 1e-5)
        return x + self.down(self.gate_up.silu_mul(h, self.fuse_act))


class Decoder(nn.Module):
    """Random-weight Llama decoder with a static KV cache for ``batch`` sequences of ``context`` slots."""

    def __init__(self, shape: DecoderShape, build: Build, batch: int, context: int) -> None:
        super().__init__()
        dev, dt = build.device, build.dtype
        self.register_buffer("embed", torch.randn(shape.vocab, shape.hidden, device=dev, dtype=dt))
        self.register_buffer("final_norm", torch.ones(shape.hidden, device=dev, dtype=dt))
        self.layers = nn.ModuleList(DecoderLayer(shape, build, batch, context) for _ in range(shape.layers))
        exponents = torch.arange(0, shape.head_dim, 2, device=dev, dtype=torch.float32) / shape.head_dim
        inv_freq = 1.0 / shape.rope_theta**exponents
        angles = torch.outer(torch.arange(context, device=dev, dtype=torch.float32), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos().to(dt))
        self.register_buffer("sin", angles.sin().to(dt))
        self.register_buffer("slots", torch.arange(context, device=dev))

    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step: ``tokens [B]`` at position ``pos [1]`` -> greedy next tokens ``[B]``. No host syncs."""
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        mask = (self.slots <= pos).view(1, 1, 1, -1)  # attend to filled slots only
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        logits = F.linear(F.rms_norm(x, x.shape[-1:], self.final_norm, 1e-5), self.embed)
        return logits.argmax(dim=-1)

    def linear_bytes(self) -> int:
        return sum(m.nbytes() for m in self.modules() if isinstance(m, Linear))


def tokens_per_second(model: Decoder, batch: int, steps: int, cuda_graph: bool, device: torch.device) -> float:
    """Decode throughput: ``steps`` steps of ``batch`` tokens, as one CUDA graph replayed or eagerly."""
    tokens = torch.randint(0, model.embed.shape[0], (batch,), device=device)
    pos = torch.tensor([model.slots.numel() // 2], device=device)

    def step() -> None:
        tokens.copy_(model.step(tokens, pos))

    for _ in range(3):  # warm-up: Triton compiles, cuBLAS picks algorithms
        step()
    if cuda_graph:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    else:
        run = step
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_preset(name: str, shape: DecoderShape, args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    builds = [Build(None, args.dtype, args.device)] + [
        Build(r, args.dtype, args.device, args.rank_align, args.fuse_act) for r in args.ratios
    ]
    for batch in args.batch_sizes:
        dense_tps = None
        for build in builds:
            torch.manual_seed(0)
            with torch.inference_mode():
                model = Decoder(shape, build, batch, args.context)
                tps = tokens_per_second(model, batch, args.steps, args.cuda_graph, args.device)
            dense_tps = tps if build.ratio is None else dense_tps
            rows.append(
                {
                    "preset": name, **asdict(shape), "variant": build.name, "ratio": build.ratio, "batch": batch,
                    "tokens_per_s": tps, "step_ms": 1e3 * batch / tps, "ratio_to_dense": tps / dense_tps,
                    "linear_bytes": model.linear_bytes(), "fuse_act": build.fuse_act,
                }
            )  # fmt: skip
            r = rows[-1]
            print(
                f"{name:<13} L={shape.layers:<3} B={batch:<3} {build.name:<14} {tps:>10.1f} tok/s "
                f"{r['step_ms']:>8.3f} ms/step  x{r['ratio_to_dense']:.2f} vs dense  "
                f"linears {r['linear_bytes'] / 2**20:.2f} MiB",
                flush=True,
            )
            del model
            gc.collect()
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], title: str):
    """Tokens/s per variant, grouped by batch size, one panel per preset; labels give the ratio to dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4), squeeze=False)
    for ax, preset in zip(axes.flat, presets):
        sel = [r for r in rows if r["preset"] == preset]
        variants = list(dict.fromkeys(r["variant"] for r in sel))
        batches = list(dict.fromkeys(r["batch"] for r in sel))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            vals = [next(r for r in sel if r["variant"] == variant and r["batch"] == b) for b in batches]
            xs = [j + i * width for j in range(len(batches))]
            bars = ax.bar(xs, [r["tokens_per_s"] for r in vals], width, label=variant, color=f"C{i}")
            ax.bar_label(bars, [f"x{r['ratio_to_dense']:.2f}" for r in vals], fontsize=7)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{preset} ({sel[0]['layers']} layers)", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add = parser.add_argument
    add("--presets", help=f"comma-separated, from {list(PRESETS)} (default smollm2-135m,llama-7b)")
    add("--llama-layers", type=int, help="layers of the llama-7b preset (default 32; fewer to save memory and time)")
    add("--batch-sizes", type=parse_ints, help="sequences decoded together (default 1,8)")
    add("--context", type=int, help="KV-cache slots; attention spans all of them (default 512)")
    add("--steps", type=int, help="timed decode steps per measurement (default 200)")
    add(
        "--fuse-act", action="store_true",
        help="low-rank MLPs: SiLU(gate)*up fused into the expand kernel (lowrank_silu_mul here)",
    )  # fmt: skip
    add("--no-cuda-graph", dest="cuda_graph", action="store_false", help="CUDA: time eager steps, not a captured graph")
    add(
        "--quick", action="store_true",
        help="smoke run defaults: tiny model, ratio 0.5, batch 1,2, 3 steps, context 32, no CUDA graph",
    )  # fmt: skip
    args = parser.parse_args(argv)
    resolve_common_args(
        parser, args,
        {
            "presets": ("tiny", "smollm2-135m,llama-7b"), "ratios": ([0.5], [0.2, 0.3, 0.4, 0.5]),
            "batch_sizes": ([1, 2], [1, 8]), "steps": (3, 200), "context": (32, 512),
        },
    )  # fmt: skip
    args.cuda_graph = args.cuda_graph and not args.quick and args.device.type == "cuda"
    unknown = set(args.presets.split(",")) - set(PRESETS)
    if unknown:
        parser.error(f"unknown presets {sorted(unknown)}; choose from {list(PRESETS)}")
    if args.context < 2 or args.steps < 1:
        parser.error("--context must be >= 2 and --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment(args.device)
    print(f"# {env['device']}, {args.dtype}, CUDA graph: {args.cuda_graph}, torch {env['torch']}, triton {env['triton']}")
    rows = []
    for name in args.presets.split(","):
        shape = PRESETS[name]
        if name == "llama-7b" and args.llama_layers:
            shape = replace(shape, layers=args.llama_layers)
        rows += bench_preset(name, shape, args)
    payload = {"environment": env, "config": run_config(args), "results": rows}
    dtype = str(args.dtype).removeprefix("torch.")
    title = f"decode throughput, {env['device']}, {dtype}, CUDA graph {args.cuda_graph}"
    figure = None if args.no_plot else plot(rows, title)
    for path in write_results("decode_bench", payload, args.out_dir, figure):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
