"""Compile the real (not interpreted) kernels ahead of time for Hopper and Ampere, without a GPU.

The interpreter is more lenient than the compiler (types of values merged across branches,
dot operand shapes, ...). Triton's CUDA backend compiles to a cubin with its bundled ptxas and
no driver, so every kernel variant is checked to compile here too. Pointer arguments are marked
16-byte aligned as a real launch would specialise them.
"""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_lowrank  # noqa: E402

_POINTERS = {"src_ptr", "v_ptr", "u_ptr", "bias_ptr", "out_ptr"}

pytestmark = pytest.mark.skipif(
    triton_lowrank.INTERPRETED, reason="TRITON_INTERPRET is set: the module's kernels are interpreted, not compiled"
)


def _compile(dtype: str, arch: int, **constexprs: object) -> dict[str, object]:
    params = list(inspect.signature(triton_lowrank._lowrank_kernel.fn).parameters)
    signature = {}
    for name in params:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "meta_ptr":
            signature[name] = "*i32"
        else:
            signature[name] = f"*{dtype}" if name in _POINTERS else "i32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(params) if name.endswith("_ptr")}
    source = ASTSource(fn=triton_lowrank._lowrank_kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": 4, "num_stages": 2, "enable_fp_fusion": True}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm


@pytest.mark.parametrize(
    ("dtype", "fused", "gated", "aligned", "block_m"),
    [
        ("bf16", True, False, False, 16),
        ("bf16", False, False, True, 64),
        ("bf16", True, True, True, 16),
        ("bf16", False, True, False, 16),
        ("fp16", True, False, True, 64),
        ("fp32", False, False, False, 16),
    ],
)
def test_compiles_for_sm90(dtype, fused, gated, aligned, block_m):
    asm = _compile(
        dtype, 90,
        NUM_SEGS=2 if gated else 3, HAS_BIAS=True, FUSED_SHRINK=fused, GATED=gated, RANKS_ALIGNED=aligned,
        BLOCK_M=block_m, BLOCK_N=64 if fused else 32, BLOCK_R=64, BLOCK_K=64,
        UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32",
    )  # fmt: skip
    assert asm["cubin"]


def test_compiles_for_sm80():
    asm = _compile(
        "bf16", 80,
        NUM_SEGS=3, HAS_BIAS=False, FUSED_SHRINK=True, GATED=False, RANKS_ALIGNED=False,
        BLOCK_M=16, BLOCK_N=64, BLOCK_R=64, BLOCK_K=64, UPCAST=False, PRECISION="tf32",
    )  # fmt: skip
    assert asm["cubin"]
