"""The CPU oneDNN path of the low-rank layers against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from kernels import lowrank_forward_reference, pack_expand
from soco_serve import cpu_gemm

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this vLLM build has no oneDNN ops")

# (out, rank) per segment; rank None = identity segment (a part kept dense).
LAYOUTS = {"single": [(48, 17)], "gate_up": [(40, 9), (40, 12)], "qkv_identity": [(33, 17), (8, None), (8, 3)]}


def _layer(layout, in_features=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = [r if r is not None else out for out, r in layout]
    us = [None if r is None else torch.randn(out, r, generator=g) for out, r in layout]
    v_cat = torch.randn(sum(ranks), in_features, generator=g)
    bias = torch.randn(sum(out for out, _ in layout), generator=g)
    return v_cat, us, ranks, bias


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_low_rank_matches_reference(layout, tokens, with_bias):
    v_cat, us, ranks, bias = _layer(LAYOUTS[layout])
    bias = bias if with_bias else None
    layer = cpu_gemm.OneDnnLowRank.build(cpu_gemm.prepack(v_cat), us, ranks)
    packed = pack_expand(us, ranks, 1)
    assert layer.segments == packed.segments and layer.total_out == packed.total_out
    x = torch.randn(2, tokens, v_cat.shape[1])
    ref = lowrank_forward_reference(x, v_cat, packed, bias)
    y = layer(x, bias)
    assert y.shape == (2, tokens, packed.total_out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    # the two halves, as the row-parallel TP path calls them
    h = layer.shrink_x(x)
    torch.testing.assert_close(layer.expand_h(h, bias).view_as(y), y, rtol=0, atol=0)


def test_handlers_own_their_copies():
    v_cat, us, ranks, _ = _layer(LAYOUTS["gate_up"])
    x = torch.randn(3, v_cat.shape[1])
    layer = cpu_gemm.OneDnnLowRank.build(cpu_gemm.prepack(v_cat), us, ranks)
    ref = lowrank_forward_reference(x, v_cat, pack_expand(us, ranks, 1))
    for t in (v_cat, *us):
        t.zero_()  # the layer's own tensors may be released after packing
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-4, atol=1e-4)
