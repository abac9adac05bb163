"""The packing (``kernels.segments``) and the torch path (``kernels.torch_lowrank``, through ``kernels.ops``), against the references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import (
    META_FIELDS,
    lowrank_expand,
    lowrank_forward,
    lowrank_forward_reference,
    lowrank_forward_torch,
    lowrank_shrink,
    pack_expand,
)
from kernels.segments import U_ROW_ALIGN

# (out, rank) per segment; rank None = identity (dense) segment.
LAYOUTS = {
    "single": [(33, 17)],
    "single_rank1": [(8, 1)],
    "identity_only": [(8, None)],
    "qkv": [(33, 17), (8, 3), (8, 1)],
    "qkv_identity": [(33, 17), (8, None), (8, 3)],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_matches_dense_weight(layout, make_layer, check_close):
    layer = make_layer(40, LAYOUTS[layout], dtype=torch.float64, bias=True)
    x = torch.randn(5, 40, dtype=torch.float64)
    check_close(lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias), layer.dense_forward(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (3,), (16,), (2, 3), (0,)], ids=str)
def test_torch_path_matches_reference(dtype, layout, bias, lead, make_layer, check_close):
    layer = make_layer(24, LAYOUTS[layout], dtype=dtype, bias=bias)
    x = torch.randn(*lead, 24, dtype=dtype)
    y = lowrank_forward(x, layer.v_cat, layer.packed, layer.bias)
    assert y.shape == (*lead, layer.packed.total_out) and y.dtype == dtype
    if x.numel():
        check_close(y, lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias))
    torch.testing.assert_close(lowrank_forward_torch(x, layer.v_cat, layer.packed, layer.bias), y)


@pytest.mark.parametrize("v_split", [[17, 11], [17, 8, 3], [5, 12, 11]], ids=str)
def test_v_in_parts_equals_one_v(v_split, make_layer, check_close):
    """``v_cat`` given as row blocks (a shared basis beside the layer's own rows): the same
    forward, shrink and expand, on every path here."""
    layer = make_layer(24, LAYOUTS["qkv_identity"], bias=True)
    parts = layer.v_cat.split(v_split)
    x = torch.randn(2, 5, 24)
    y = lowrank_forward(x, parts, layer.packed, layer.bias)
    torch.testing.assert_close(y, lowrank_forward(x, layer.v_cat, layer.packed, layer.bias))
    torch.testing.assert_close(lowrank_forward_torch(x, list(parts), layer.packed, layer.bias), y)
    check_close(y, lowrank_forward_reference(x, parts, layer.packed, layer.bias))
    check_close(y, layer.dense_forward(x))
    h = lowrank_shrink(x, parts)
    torch.testing.assert_close(h, x @ layer.v_cat.T)
    torch.testing.assert_close(lowrank_expand(h, layer.packed, layer.bias), y)


def test_torch_path_takes_strided_input(make_layer, check_close):
    layer = make_layer(24, LAYOUTS["qkv_identity"], bias=True)
    x = torch.randn(24, 6).t()  # [6, 24], non-contiguous
    y = lowrank_forward(x, layer.v_cat, layer.packed, layer.bias)
    check_close(y, lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_expand_of_shrink_is_forward(layout, bias, make_layer, check_close):
    """``lowrank_expand(x v_catᵀ)`` (the row-parallel TP path) equals the whole forward; h is left untouched."""
    layer = make_layer(24, LAYOUTS[layout], bias=bias)
    x = torch.randn(2, 3, 24)
    h = x @ layer.v_cat.T
    h_before = h.clone()
    y = lowrank_expand(h, layer.packed, layer.bias)
    check_close(y, lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias))
    assert torch.equal(h, h_before)


def test_expand_rejects_mismatched_operands(make_layer):
    layer = make_layer(24, LAYOUTS["qkv"], bias=True)
    with pytest.raises(ValueError, match="h has 20 columns, the packed factors expect 21"):
        lowrank_expand(torch.randn(2, 20), layer.packed)
    with pytest.raises(ValueError, match=r"bias must be \[49\]"):
        lowrank_expand(torch.randn(2, 21), layer.packed, layer.bias[:3])
    with pytest.raises(ValueError, match="one dtype and device.*h: torch.float64"):
        lowrank_expand(torch.randn(2, 21, dtype=torch.float64), layer.packed)


@pytest.mark.parametrize("bias", [False, True])
def test_silu_mul_torch_path(bias, make_layer, check_close, silu_mul):
    layer = make_layer(24, [(33, 17), (33, 5)], bias=bias)
    x = torch.randn(2, 3, 24)
    ref = lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias)
    gate, up = ref.split(33, dim=-1)
    check_close(silu_mul(x, layer.v_cat, layer.packed, layer.bias), F.silu(gate) * up)


def test_silu_mul_needs_two_equal_segments(make_layer, silu_mul):
    layer = make_layer(24, [(33, 17), (8, 5)])
    with pytest.raises(ValueError, match="two segments .* equal size"):
        silu_mul(torch.randn(1, 24), layer.v_cat, layer.packed)


def test_pack_roundtrip_and_metadata():
    us = [torch.randn(33, 17), None, torch.randn(8, 3)]
    packed = pack_expand(us, [17, 5, 3])
    assert packed.total_rank == 25 and packed.total_out == 46 and packed.num_segments == 3
    for got, want in zip(packed.unpack(), us):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(got, want)
    first, ident, last = packed.segments
    assert (first.rank_offset, first.out_offset, first.u_offset, first.u_stride) == (0, 0, 0, 24)
    assert ident.identity and (ident.rank_offset, ident.out_offset, ident.out_size) == (17, 33, 5)
    assert (last.rank_offset, last.out_offset, last.u_offset, last.u_stride) == (22, 38, 33 * 24, 8)
    assert all(s.u_offset % U_ROW_ALIGN == 0 for s in packed.segments if not s.identity)
    # Row padding is zero, and the device table says the same as the Python ints.
    assert not packed.u_flat[: 33 * 24].view(33, 24)[:, 17:].any()
    assert packed.meta.dtype == torch.int32 and packed.meta.shape == (len(META_FIELDS), 3)
    assert packed.meta.t().tolist() == [list(s.as_row()) for s in packed.segments]


def test_pack_to_casts_and_keeps_layout():
    packed = pack_expand([torch.randn(8, 3, dtype=torch.float64)], [3]).to(dtype=torch.float32)
    assert packed.dtype == torch.float32 and packed.meta.dtype == torch.int32
    assert packed.expand_t[0].shape == (3, 8)


def test_pack_copies_its_input():
    u = torch.randn(8, 3)
    packed = pack_expand([u], [3])
    u.zero_()
    assert packed.unpack()[0].abs().sum() > 0


@pytest.mark.parametrize(
    ("us", "ranks", "error", "match"),
    [
        ([torch.randn(8, 3)], [3, 4], ValueError, "1 expand factors but 2 ranks"),
        ([], [], ValueError, "at least one segment"),
        ([torch.randn(8, 3)], [4], ValueError, r"segment 0: U must be 2-D \[out, rank\] = \[out, 4\].*\(8, 3\)"),
        ([torch.randn(8, 3), torch.randn(24)], [3, 24], ValueError, r"segment 1: U must be 2-D.*\(24,\)"),
        ([torch.randn(0, 3)], [3], ValueError, "out >= 1"),
        ([torch.randn(8, 3)], [0], ValueError, "segment 0: rank must be a positive int, got 0"),
        ([None], [2.0], ValueError, "rank must be a positive int, got 2.0"),
        ([torch.randn(8, 3), torch.randn(8, 3, dtype=torch.float64)], [3, 3], ValueError, "share dtype and device"),
        ([torch.zeros(8, 3, dtype=torch.int64)], [3], TypeError, "floating-point tensor"),
        (["U"], [3], TypeError, "segment 0: U must be a floating-point tensor or None"),
    ],
)
def test_pack_rejects_bad_input(us, ranks, error, match):
    with pytest.raises(error, match=match):
        pack_expand(us, ranks)


def test_forward_rejects_mismatched_operands(make_layer):
    layer = make_layer(24, LAYOUTS["qkv"], bias=True)
    x = torch.randn(2, 24)
    with pytest.raises(ValueError, match=r"v_cat must be \[total rank, in\] = \[21, in\].*\(20, 24\)"):
        lowrank_forward(x, layer.v_cat[:20], layer.packed)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., in\] with in = 24.*\(2, 25\)"):
        lowrank_forward(torch.randn(2, 25), layer.v_cat, layer.packed)
    with pytest.raises(ValueError, match=r"bias must be \[49\].*\(48,\)"):
        lowrank_forward(x, layer.v_cat, layer.packed, layer.bias[:48])
    with pytest.raises(ValueError, match="one dtype and device.*x: torch.float64 on cpu, v_cat: torch.float32"):
        lowrank_forward(x.double(), layer.v_cat, layer.packed)
    with pytest.raises(ValueError, match=r"or row blocks that stack to it\), got shapes \(17, 24\), \(3, 24\)"):
        lowrank_forward(x, [layer.v_cat[:17], layer.v_cat[17:20]], layer.packed)
    with pytest.raises(ValueError, match=r"got shapes \(17, 24\), \(4, 23\)"):
        lowrank_forward(x, [layer.v_cat[:17], layer.v_cat[17:, :23]], layer.packed)
    with pytest.raises(ValueError, match="got none"):
        lowrank_forward(x, [], layer.packed)
    with pytest.raises(ValueError, match="v_cat part 0: torch.float32 on cpu, v_cat part 1: torch.float64"):
        lowrank_forward(x, [layer.v_cat[:17], layer.v_cat[17:].double()], layer.packed)


def test_unaligned_pack_is_exact_and_kept_off_the_kernels():
    import kernels

    g = torch.Generator().manual_seed(3)
    us = [torch.randn(5, 3, generator=g), None, torch.randn(4, 9, generator=g)]
    ranks = [3, 6, 9]
    x = torch.randn(2, 7, 16, generator=g)
    v = torch.randn(sum(ranks), 16, generator=g)
    tight = kernels.pack_expand(us, ranks, row_align=1)
    assert tight.u_flat.numel() == 5 * 3 + 4 * 9 and not tight.kernel_aligned
    assert kernels.pack_expand(us, ranks).kernel_aligned
    torch.testing.assert_close(kernels.lowrank_forward(x, v, tight),
                               kernels.lowrank_forward_reference(x, v, tight).float(), rtol=1e-5, atol=1e-5)
