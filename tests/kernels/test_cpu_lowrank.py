"""The fused CPU kernel (``kernels/csrc/lowrank_cpu.cpp``) against the dense float64 oracle.

Every instruction-set path is checked on every machine: the native build (what a server on this
machine runs), and AVX2-only and plain-C++ builds under their own op namespaces.
"""

from __future__ import annotations

import platform

import pytest
import torch

from kernels import cpu_lowrank
from kernels.cpu_lowrank import PANEL, CpuLowRank, pack_panels, unpack_panels

from .conftest import assert_close, build_layer

if not cpu_lowrank.available():
    pytest.fail("the CPU low-rank kernel did not build here (see the log above)", pytrace=False)

# name -> (op namespace, extra compiler flags); "native" is the one the layers use.
VARIANTS = {"native": (cpu_lowrank.NAMESPACE, None)}
if platform.machine() in ("x86_64", "AMD64"):
    VARIANTS["avx2"] = ("soco_cpu_avx2", ("-march=haswell", "-mno-avx512f"))
    VARIANTS["plain"] = ("soco_cpu_plain", ("-march=x86-64",))

# (out, rank) per segment; rank None = identity (dense) segment. Output sizes on both sides of
# the 32-wide panels, so full and masked edge panels are both exercised.
LAYOUTS = {
    "single": [(70, 17)],
    "narrow": [(5, 3)],
    "gate_up": [(64, 9), (64, 40)],
    "qkv_identity": [(33, 17), (8, None), (8, 3)],
    "identity_only": [(40, None)],
}
TOKENS = [0, 1, 2, 3, 7, 8, 9, 25, 100, 300]  # across the microkernel's 3 / 8 rows and the token chunks


@pytest.fixture(scope="module", params=list(VARIANTS))
def ops(request):
    namespace, flags = VARIANTS[request.param]
    if flags is not None:
        cpu_lowrank.build(f"soco_lowrank_cpu_{request.param}", namespace, flags)
    return getattr(torch.ops, namespace)


def _cpu_layer(in_features: int, layout, bias: bool = False, v_split: list[int] | None = None):
    """A random layer and its kernel form; ``v_split``: rows of each part ``v_cat`` is packed in (default one)."""
    layer = build_layer(in_features, layout, bias=bias)
    us = layer.packed.unpack()
    ranks = [s.rank for s in layer.packed.segments]
    parts = [pack_panels(v) for v in layer.v_cat.split(v_split or layer.v_cat.shape[0])]
    return layer, CpuLowRank.build(parts, in_features, us, ranks)


def _lowrank(ops, x, cpu, bias):
    return ops.lowrank(x, list(cpu.v), cpu.u, cpu.meta, bias, list(cpu.v_ranks), cpu.out_features)


@pytest.mark.parametrize("n", [1, 5, PANEL - 1, PANEL, PANEL + 1, 3 * PANEL + 7])
def test_panels_round_trip(n):
    w = torch.randn(n, 13)
    packed = pack_panels(w)
    assert packed.shape == (n * 13,) and packed.is_contiguous()  # one copy, no padding
    assert torch.equal(unpack_panels(packed, n, 13), w)
    assert torch.equal(packed[: 13 * min(n, PANEL)].view(13, -1)[:, 0], w[0])  # panel 0 is wᵀ[:, :32]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_lowrank_matches_dense(ops, layout, bias):
    layer, cpu = _cpu_layer(48, LAYOUTS[layout], bias)
    for tokens in TOKENS:
        x = torch.randn(tokens, 48)
        y = _lowrank(ops, x, cpu, layer.bias)
        assert_close(y, layer.dense_forward(x))
        h = ops.shrink(x, list(cpu.v), list(cpu.v_ranks))
        assert_close(h, x.double() @ layer.v_cat.double().T)
        torch.testing.assert_close(ops.expand(h, cpu.u, cpu.meta, layer.bias, cpu.out_features), y, rtol=0, atol=0)


def test_long_inputs_use_small_token_chunks(ops):
    """Wide inputs shrink the token chunks (they must stay in L2): many chunks, uneven last one."""
    layer, cpu = _cpu_layer(1500, [(96, 40), (50, 7)], bias=True)
    x = torch.randn(203, 1500)
    assert_close(_lowrank(ops, x, cpu, layer.bias), layer.dense_forward(x))


# Row blocks of qkv_identity's v_cat (17 + 8 + 3 rows): at segment boundaries (a shared q basis
# beside the layer's own k and v rows), across them, and one row per part past a panel's width.
V_SPLITS = [[17, 11], [17, 8, 3], [5, 20, 3], [1] * 28]


@pytest.mark.parametrize("v_split", V_SPLITS, ids=lambda s: "+".join(map(str, s[:4])))
def test_shrink_in_parts_equals_one_tensor(ops, v_split):
    """v_cat in row blocks (each packed on its own) gives the one-tensor result bit for bit."""
    layer, whole = _cpu_layer(48, LAYOUTS["qkv_identity"], bias=True)
    parts = CpuLowRank.build([pack_panels(v) for v in layer.v_cat.split(v_split)], 48, layer.packed.unpack(),
                             [s.rank for s in layer.packed.segments])
    assert parts.v_ranks == tuple(v_split) and parts.rank_total == whole.rank_total
    for tokens in (0, 1, 4, 9, 70):
        x = torch.randn(tokens, 48)
        y = _lowrank(ops, x, parts, layer.bias)
        torch.testing.assert_close(y, _lowrank(ops, x, whole, layer.bias), rtol=0, atol=0)
        torch.testing.assert_close(ops.shrink(x, list(parts.v), list(parts.v_ranks)),
                                   ops.shrink(x, list(whole.v), list(whole.v_ranks)), rtol=0, atol=0)
        assert_close(y, layer.dense_forward(x))


def test_layer_call_takes_any_leading_shape_and_row_stride():
    layer, cpu = _cpu_layer(40, LAYOUTS["qkv_identity"], bias=True)
    x = torch.randn(2, 5, 40)
    y = cpu(x, layer.bias)
    assert y.shape == (2, 5, cpu.out_features)
    assert_close(y, layer.dense_forward(x))
    wide = torch.randn(6, 64)
    assert_close(cpu(wide[:, :40], layer.bias), layer.dense_forward(wide[:, :40]))  # row stride 64
    assert_close(cpu.expand(cpu.shrink(x), layer.bias).view_as(y), layer.dense_forward(x))


def test_bad_inputs_are_named():
    layer, cpu = _cpu_layer(40, LAYOUTS["single"])
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 40\]"):
        cpu(torch.randn(3, 41))
    with pytest.raises(RuntimeError, match="float32 only"):
        cpu(torch.randn(3, 40, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="bias must be"):
        cpu(torch.randn(3, 40), torch.randn(7))
    with pytest.raises(ValueError, match="v holds"):
        CpuLowRank.build(pack_panels(layer.v_cat), 41, layer.packed.unpack(), [17])
    with pytest.raises(ValueError, match="v holds"):
        CpuLowRank.build(pack_panels(layer.v_cat[:-1]), 40, layer.packed.unpack(), [17])
    with pytest.raises(RuntimeError, match="2 shrink parts for 1 ranks"):
        torch.ops.soco_cpu.shrink(torch.randn(3, 40), list(cpu.v) * 2, [17])


def test_traces_under_torch_compile():
    """vLLM compiles CPU models with Dynamo: the ops must trace (fake shapes) and run compiled."""
    layer, cpu = _cpu_layer(40, LAYOUTS["gate_up"], bias=True)
    fn = torch.compile(lambda x: cpu(x, layer.bias) * 2, backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (1, 9, 33):
        x = torch.randn(tokens, 40)
        assert_close(fn(x), 2 * layer.dense_forward(x))
