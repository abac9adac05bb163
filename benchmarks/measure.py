"""Helpers shared by the benchmarks.

Rank choice, random low-rank layers, timing (Triton's ``do_bench`` on CUDA, a median timer on
CPU), device naming and result files live here once, so each benchmark only describes what it
measures.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernels.segments import PackedExpand, pack_expand

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def rank_for_ratio(in_features: int, out_features: int, ratio: float, align: int = 1) -> int:
    """Rank keeping ``1 - ratio`` of a dense ``[out, in]`` matrix's parameters: ``floor(in*out*(1-ratio)/(in+out))``.

    ``align`` > 1 rounds down to a multiple of it (8 makes the kernels' loads aligned); at least 1.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"compression ratio must be in [0, 1), got {ratio}")
    rank = math.floor(in_features * out_features * (1.0 - ratio) / (in_features + out_features))
    return max(align, rank // align * align) if align > 1 else max(1, rank)


@dataclass
class LowRankWeights:
    """A random fused low-rank layer: the kernels' operands."""

    v_cat: torch.Tensor
    packed: PackedExpand

    @property
    def ranks(self) -> list[int]:
        return [s.rank for s in self.packed.segments]

    def nbytes(self) -> int:
        """Bytes a forward must read: ``v_cat`` and every ``U_j`` (without the row padding)."""
        u_elements = sum(s.out_size * s.rank for s in self.packed.segments if not s.identity)
        return (self.v_cat.numel() + u_elements) * self.v_cat.element_size()


def random_lowrank(
    in_features: int, outs: Sequence[int], ranks: Sequence[int], *, dtype: torch.dtype, device: torch.device | str
) -> LowRankWeights:
    """Random factors scaled by 1/sqrt(fan-in), so activations stay O(1) through a deep stack."""
    v_cat = torch.randn(sum(ranks), in_features, device=device, dtype=dtype) / in_features**0.5
    us = [torch.randn(out, rank, device=device, dtype=dtype) / rank**0.5 for out, rank in zip(outs, ranks)]
    return LowRankWeights(v_cat, pack_expand(us, list(ranks)))


def lowrank_for_ratio(
    in_features: int,
    outs: Sequence[int],
    ratio: float,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    rank_align: int = 1,
) -> LowRankWeights:
    """:func:`random_lowrank` with each segment's rank from :func:`rank_for_ratio`."""
    ranks = [rank_for_ratio(in_features, out, ratio, rank_align) for out in outs]
    return random_lowrank(in_features, outs, ranks, dtype=dtype, device=device)


def device_name(device: torch.device) -> str:
    """Human-readable name: the GPU's (``NVIDIA H100 80GB HBM3``) or the CPU's (:func:`cpu_name`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: cpu_name falls back to the platform's name
        cpuinfo = ""
    return cpu_name(cpuinfo)


def cpu_name(cpuinfo: str) -> str:
    """``CPU <model name> (family <cpu family>)`` from the text of ``/proc/cpuinfo``.

    Virtual machines often report a bare ``AMD EPYC`` for generations that differ twofold in
    speed, so the family number goes into the name: result files from two generations then get
    two names instead of overwriting each other.
    """
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    family = f" (family {fields['cpu family']})" if "cpu family" in fields else ""
    return f"CPU {fields.get('model name') or platform.processor() or platform.machine()}{family}"


def device_slug(name: str) -> str:
    """File-name-safe form of :func:`device_name`: ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def time_ms(fn: Callable[[], Any], device: torch.device, *, cpu_reps: int = 20) -> float:
    """Median milliseconds per call of ``fn``.

    CUDA: ``triton.testing.do_bench`` (L2 flushed between calls, so weights come from HBM as in
    a real decode step). CPU: one warm-up call, then the median of ``cpu_reps`` timed calls.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    samples = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def time_ms_interleaved(fns: dict[str, Callable[[], Any]], *, reps: int = 20) -> dict[str, float]:
    """Median CPU milliseconds per call of each of ``fns``, timed in turns (one call of each per
    round, the order rotated every round), so that a neighbour's load or a clock change on a shared
    machine falls on all of them alike rather than on whichever ran at that moment."""
    names = list(fns)
    for name in names:
        fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a result: device, library versions, time."""
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_slug": device_slug(device_name(device)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_results(stem: str, payload: dict[str, Any], out_dir: Path, figure: Any | None = None) -> list[Path]:
    """Write ``<stem>_<device-slug>.json`` (and ``.png`` from a matplotlib figure) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{stem}_{payload['environment']['device_slug']}"
    paths = [base.with_suffix(".json")]
    paths[0].write_text(json.dumps(payload, indent=1) + "\n")
    if figure is not None:
        paths.append(base.with_suffix(".png"))
        figure.savefig(paths[1], dpi=120, bbox_inches="tight")
    return paths


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options both benchmarks share: device, dtype, ratios, rank rounding, output."""
    add = parser.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda if available)")
    add("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU (CPU bf16 is emulated and slow)")
    add("--ratios", type=parse_floats, help="compression ratios (default 0.2,0.3,0.4,0.5)")
    add(
        "--rank-align", type=int, default=1,
        help="round ranks down to a multiple of this (8: the kernels' aligned-load case; default 1: the exact formula)",
    )  # fmt: skip
    add("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR, help=f"where JSON and PNG go (default {DEFAULT_RESULTS_DIR})")
    add("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")


def resolve_common_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict[str, tuple[Any, Any]]
) -> None:
    """Fill options left unset from ``defaults`` (name -> (value with ``--quick``, value without)),
    turn ``--device``/``--dtype`` into torch objects and check the ratios; in place.

    Options given explicitly win over ``--quick``.
    """
    defaults = {"ratios": ([0.2, 0.5], [0.2, 0.3, 0.4, 0.5]), **defaults}
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.device = torch.device(args.device)
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    if any(not 0.0 <= r < 1.0 for r in args.ratios):
        parser.error(f"--ratios must lie in [0, 1), got {args.ratios}")


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """``args`` as JSON-ready values, for the result file."""
    return {k: (str(v) if isinstance(v, (Path, torch.device, torch.dtype)) else v) for k, v in vars(args).items()}


def parse_floats(text: str) -> list[float]:
    """``"0.2,0.3"`` -> ``[0.2, 0.3]`` (argparse type)."""
    return [float(item) for item in text.split(",") if item]


def parse_ints(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (argparse type)."""
    return [int(item) for item in text.split(",") if item]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
