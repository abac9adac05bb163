"""The compiled Triton path on a real GPU: real sizes in bf16, dispatch, CUDA graphs, and the small tail cases.

Skipped (with the reason shown) where CUDA is unavailable; select with ``-m gpu``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import TRITON_MAX_TOKENS, lowrank_expand, lowrank_forward, lowrank_forward_reference

from .conftest import Linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

BF16 = torch.bfloat16
MODES = ["fused", "two_phase"]


@pytest.fixture(scope="module")
def triton_lowrank():
    from kernels import triton_lowrank

    if triton_lowrank.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: kernels would run on the interpreter, not the GPU")
    return triton_lowrank


def _reference(layer, x):
    return lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_7b_mlp_shape(triton_lowrank, make_layer, check_close, mode, tokens):
    layer = make_layer(4096, [(11008, 1024)], dtype=BF16, device="cuda")
    x = torch.randn(tokens, 4096, device="cuda", dtype=BF16)
    y = triton_lowrank.lowrank_forward_triton(x, layer.v_cat, layer.packed, mode=mode)
    check_close(y, _reference(layer, x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("identity", [False, True], ids=["lowrank", "with_identity"])
def test_7b_fused_qkv_with_bias(triton_lowrank, make_layer, check_close, mode, identity):
    segments = [(4096, 1024), (4096, None if identity else 1024), (4096, 1024)]
    layer = make_layer(4096, segments, dtype=BF16, device="cuda", bias=True)
    x = torch.randn(8, 4096, device="cuda", dtype=BF16)
    y = triton_lowrank.lowrank_forward_triton(x, layer.v_cat, layer.packed, layer.bias, mode=mode)
    check_close(y, _reference(layer, x))


@pytest.mark.parametrize("mode", MODES)
def test_7b_gate_up_silu(triton_lowrank, make_layer, check_close, mode):
    layer = make_layer(4096, [(11008, 1492), (11008, 1492)], dtype=BF16, device="cuda")
    x = torch.randn(4, 4096, device="cuda", dtype=BF16)
    y = triton_lowrank.lowrank_silu_mul_triton(x, layer.v_cat, layer.packed, mode=mode)
    gate, up = _reference(layer, x).split(11008, dim=-1)
    check_close(y, F.silu(gate) * up)


@pytest.mark.parametrize("tokens", [1, TRITON_MAX_TOKENS, TRITON_MAX_TOKENS + 1, 700])
def test_dispatch_3d_input(make_layer, check_close, silu_mul, tokens):
    """Both sides of the token threshold (Triton, then cuBLAS), leading dims kept."""
    layer = make_layer(576, [(576, 230), (192, 115), (192, 115)], dtype=BF16, device="cuda", bias=True)
    x = torch.randn(1, tokens, 576, device="cuda", dtype=BF16)
    y = lowrank_forward(x, layer.v_cat, layer.packed, layer.bias)
    assert y.shape == (1, tokens, 960)
    check_close(y, _reference(layer, x))
    gate_up = make_layer(576, [(1536, 335), (1536, 335)], dtype=BF16, device="cuda")
    gate, up = _reference(gate_up, x).split(1536, dim=-1)
    check_close(silu_mul(x, gate_up.v_cat, gate_up.packed), F.silu(gate) * up)


@pytest.mark.parametrize("tokens", [1, TRITON_MAX_TOKENS + 1])
def test_expand_dispatch(make_layer, check_close, tokens):
    """The row-parallel TP path: expand of a given h (Triton for decode sizes, then torch)."""
    layer = make_layer(4096, [(4096, 1024)], dtype=BF16, device="cuda", bias=True)
    x = torch.randn(tokens, 4096, device="cuda", dtype=BF16)
    check_close(lowrank_expand(x @ layer.v_cat.T, layer.packed, layer.bias), _reference(layer, x))


@pytest.mark.parametrize("v_split", [None, [230, 307]], ids=["one_v", "shared_q_own_kv"])
def test_cuda_graph_replay(make_layer, check_close, v_split):
    """Captured and replayed; also with ``V`` in parts (a shared q basis beside the layer's own k/v rows)."""
    layer = make_layer(576, [(576, 230), (192, None), (192, 115)], dtype=BF16, device="cuda", bias=True)
    v = layer.v_cat.split(v_split) if v_split else layer.v_cat
    x = torch.randn(8, 576, device="cuda", dtype=BF16)
    lowrank_forward(x, v, layer.packed, layer.bias)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lowrank_forward(x, v, layer.packed, layer.bias)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check_close(y, _reference(layer, x))


def test_compiled_layer_runs_triton_for_decode(triton_lowrank, make_layer, check_close, monkeypatch):
    """As vLLM runs a layer: compiled once with inductor (token dimension dynamic, traced at a
    prefill size), then called at decode sizes. The Triton kernels must run for those (the token
    count is read inside the op, at run time), and the prefill size must not reach them."""
    launched: list[int] = []
    real_launch = triton_lowrank.launch

    def launch(x2d, *args, **kwargs):
        launched.append(x2d.shape[0])
        return real_launch(x2d, *args, **kwargs)

    monkeypatch.setattr(triton_lowrank, "launch", launch)
    layer = make_layer(576, [(576, 230), (192, 115), (192, 115)], dtype=BF16, device="cuda", bias=True)
    step = torch.compile(Linear(layer.v_cat, layer.packed, layer.bias), fullgraph=True)
    for i, tokens in enumerate((700, 2, 8, TRITON_MAX_TOKENS)):
        x = torch.randn(tokens, 576, device="cuda", dtype=BF16)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 0)
        check_close(step(x), _reference(layer, x))
    assert launched == [2, 8, TRITON_MAX_TOKENS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "segments", [[(33, 17)], [(8, 1)], [(33, 17), (8, None), (8, 3)]], ids=["single", "rank1", "qkv_identity"]
)
def test_small_tails_compiled(triton_lowrank, make_layer, check_close, dtype, mode, segments):
    """The interpreter's tail cases, compiled, with the default (large) tiles and with 16-wide ones."""
    layer = make_layer(40, segments, dtype=dtype, device="cuda", bias=True)
    x = torch.randn(3, 40, device="cuda").to(dtype)
    for config in (None, triton_lowrank.KernelConfig(block_m=16, block_n=16, block_r=16, block_k=16)):
        out = torch.full((3, layer.packed.total_out), float("nan"), device="cuda", dtype=dtype)
        triton_lowrank.lowrank_forward_triton(
            x, layer.v_cat, layer.packed, layer.bias, mode=mode, config=config, out=out
        )
        check_close(out, _reference(layer, x))
