"""The Triton kernels on the CPU interpreter (a private interpreted copy, see conftest.py), against the reference.

Small shapes chosen to hit every tail: ranks 1, 3, 17 (not multiples of the 16-wide chunks),
in 24 and 40, out 8 and 33, several tiles per segment (16-wide blocks), token counts 1, 3, 16
and 20 (two token blocks). Outputs are NaN-poisoned so an element the grid misses fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import lowrank_forward_reference, pack_expand

# (in, [(out, rank or None for identity)]) per layout.
LAYOUTS = {
    "single": (40, [(33, 17)]),
    "single_rank1": (24, [(8, 1)]),
    "qkv": (40, [(33, 17), (8, 3), (8, 1)]),
    "qkv_identity": (24, [(33, 17), (8, None), (8, 3)]),
}
MODES = ["fused", "two_phase"]


@pytest.fixture
def small(interpreted):
    """16-wide blocks: several output tiles, rank chunks and K chunks even at these sizes."""
    return interpreted.KernelConfig(block_m=16, block_n=16, block_r=16, block_k=16)


def _poisoned(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((rows, cols), float("nan"), dtype=dtype)


def _reference(layer, x):
    return lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias)


def _run(interpreted, layer, x, mode, config):
    out = _poisoned(x.shape[0], layer.packed.total_out, x.dtype)
    y = interpreted.lowrank_forward_triton(x, layer.v_cat, layer.packed, layer.bias, mode=mode, config=config, out=out)
    assert y is out
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_kernel_matches_reference(interpreted, small, make_layer, check_close, dtype, mode, layout, tokens, bias):
    in_features, segments = LAYOUTS[layout]
    layer = make_layer(in_features, segments, dtype=dtype, bias=bias)
    x = torch.randn(tokens, in_features).to(dtype)
    y = _run(interpreted, layer, x, mode, small)
    check_close(y, _reference(layer, x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["single", "qkv_identity"])
def test_bf16_with_interpreter_upcast(interpreted, small, make_layer, check_close, mode, layout):
    in_features, segments = LAYOUTS[layout]
    layer = make_layer(in_features, segments, dtype=torch.bfloat16, bias=True)
    x = torch.randn(3, in_features).to(torch.bfloat16)
    check_close(_run(interpreted, layer, x, mode, small), _reference(layer, x))


@pytest.mark.parametrize("mode", MODES)
def test_two_token_blocks(interpreted, small, make_layer, check_close, mode):
    layer = make_layer(40, LAYOUTS["qkv_identity"][1], bias=True)
    x = torch.randn(20, 40)
    check_close(_run(interpreted, layer, x, mode, small), _reference(layer, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 16])
def test_default_config_and_auto_mode(interpreted, make_layer, check_close, dtype, tokens):
    in_features, segments = LAYOUTS["qkv_identity"]
    layer = make_layer(in_features, segments, dtype=dtype, bias=True)
    x = torch.randn(tokens, in_features).to(dtype)
    y = interpreted.lowrank_forward_triton(x, layer.v_cat, layer.packed, layer.bias)
    check_close(y, _reference(layer, x))


def test_aligned_ranks(interpreted, small, make_layer, check_close):
    """Ranks that are multiples of 8 take the aligned-load specialisation."""
    layer = make_layer(40, [(33, 16), (8, 8), (8, None)], bias=True)
    x = torch.randn(3, 40)
    for mode in MODES:
        check_close(_run(interpreted, layer, x, mode, small), _reference(layer, x))


def test_writes_into_strided_out(interpreted, small, make_layer, check_close):
    layer = make_layer(24, LAYOUTS["qkv"][1])
    x = torch.randn(3, 24)
    buffer = torch.full((3, 60), float("nan"))
    out = buffer[:, 5 : 5 + layer.packed.total_out]
    interpreted.lowrank_forward_triton(x, layer.v_cat, layer.packed, out=out, config=small)
    check_close(out, lowrank_forward_reference(x, layer.v_cat, layer.packed))
    assert buffer[:, :5].isnan().all() and buffer[:, 5 + layer.packed.total_out :].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_silu_mul_matches_reference(interpreted, small, make_layer, check_close, dtype, mode, tokens, bias):
    layer = make_layer(40, [(33, 17), (33, 3)], dtype=dtype, bias=bias)
    x = torch.randn(tokens, 40).to(dtype)
    out = _poisoned(tokens, 33, dtype)
    y = interpreted.lowrank_silu_mul_triton(x, layer.v_cat, layer.packed, layer.bias, mode=mode, config=small, out=out)
    gate, up = lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias).split(33, dim=-1)
    check_close(y, F.silu(gate) * up)


@pytest.mark.parametrize("layout", ["single", "qkv_identity"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_expand_from_given_h(interpreted, small, make_layer, check_close, layout, gated):
    """``launch_expand`` (the row-parallel TP path: h comes all-reduced) against the reference."""
    in_features, segments = (40, [(33, 17), (33, 3)]) if gated else LAYOUTS[layout]
    layer = make_layer(in_features, segments, bias=True)
    x = torch.randn(3, in_features)
    h = x @ layer.v_cat.T
    n_out = 33 if gated else layer.packed.total_out
    out = _poisoned(3, n_out, torch.float32)
    interpreted.launch_expand(h, layer.packed, layer.bias, gated=gated, config=small, out=out)
    ref = _reference(layer, x)
    if gated:
        gate, up = ref.split(33, dim=-1)
        ref = F.silu(gate) * up
    check_close(out, ref)


@pytest.mark.parametrize("gated", [False, True], ids=["qkv", "gate_up"])
@pytest.mark.parametrize("tokens", [1, 16])
def test_v_in_parts_runs_two_phase(interpreted, small, make_layer, check_close, gated, tokens):
    """``V`` as row blocks (a shared basis beside the layer's own rows): auto picks two-phase, which
    shrinks part by part; the fused form, which reads one ``V``, refuses."""
    in_features, segments = (24, [(33, 17), (33, 5)]) if gated else LAYOUTS["qkv_identity"]
    layer = make_layer(in_features, segments, bias=True)
    parts = layer.v_cat.split([17, layer.v_cat.shape[0] - 17])
    x = torch.randn(tokens, in_features)
    run = interpreted.lowrank_silu_mul_triton if gated else interpreted.lowrank_forward_triton
    ref = _reference(layer, x)
    if gated:
        gate, up = ref.split(33, dim=-1)
        ref = F.silu(gate) * up
    check_close(run(x, parts, layer.packed, layer.bias, config=small), ref)
    check_close(run(x, parts, layer.packed, layer.bias, mode="two_phase", config=small), ref)
    with pytest.raises(ValueError, match="the fused form reads one V; this layer's comes in 2 parts"):
        run(x, parts, layer.packed, layer.bias, mode="fused")


def test_zero_tokens(interpreted, make_layer):
    layer = make_layer(24, LAYOUTS["qkv"][1])
    y = interpreted.lowrank_forward_triton(torch.randn(0, 24), layer.v_cat, layer.packed)
    assert y.shape == (0, layer.packed.total_out)


def test_rejects_bad_arguments(interpreted, make_layer):
    layer = make_layer(24, LAYOUTS["qkv"][1])
    x = torch.randn(3, 24)
    with pytest.raises(ValueError, match="2-D x"):
        interpreted.lowrank_forward_triton(x[None], layer.v_cat, layer.packed)
    with pytest.raises(ValueError, match="mode must be"):
        interpreted.lowrank_forward_triton(x, layer.v_cat, layer.packed, mode="split")
    with pytest.raises(ValueError, match=r"out must be \[3, 49\] torch.float32"):
        interpreted.lowrank_forward_triton(x, layer.v_cat, layer.packed, out=torch.empty(3, 48))
    with pytest.raises(ValueError, match="two segments"):
        interpreted.lowrank_silu_mul_triton(x, layer.v_cat, layer.packed)
    with pytest.raises(ValueError, match="power of two >= 16"):
        interpreted.KernelConfig(block_r=8)


def test_choose_mode_by_reread_budget(interpreted):
    """Small layers (SmolLM2 q/k/v) fuse; 7B-sized gate/up, whose V would be re-read by hundreds of tiles, do not."""

    def layer(ranks_outs):  # shapes only: factors on the meta device
        return pack_expand([torch.empty(o, r, device="meta") for o, r in ranks_outs], [r for _, r in ranks_outs])

    smol_qkv = layer([(576, 230), (192, 115), (192, 115)])
    llama_gate_up = layer([(11008, 1492), (11008, 1492)])
    assert interpreted.choose_mode(1, 576, smol_qkv, 2) == "fused"
    assert interpreted.choose_mode(1, 4096, llama_gate_up, 2) == "two_phase"
