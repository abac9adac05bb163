"""``torch.ops.soco_lowrank``: the CUDA entry points as custom ops, checked on the CPU.

vLLM compiles a model once, with a symbolic token count, and drops Dynamo's guards; the choice
between the Triton decode kernels and the torch path must therefore happen inside an op, at run
time. These tests show, without a GPU, that the ops pass torch's own op checks, that one
compiled graph holds them as opaque nodes for every token count, and that the dispatch inside
runs per call on the real count (a recording stand-in takes the place of the Triton module).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import kernels.ops as kernel_ops
from kernels import TRITON_MAX_TOKENS, PackedExpand, SegmentTable, lowrank_forward_reference, lowrank_shrink, pack_expand
from kernels.torch_lowrank import forward_2d

from .conftest import Linear, compiled_graphs

QKV = [(24, 8), (8, None), (8, 3)]  # a fused q/k/v with its k kept dense
GATE_UP = [(16, 5), (16, 5)]


def _args(layer, x):
    p = layer.packed
    return x, [layer.v_cat], p.u_flat, p.meta, layer.bias, list(p.segments.ints)


def test_table_round_trip(make_layer):
    packed = make_layer(12, QKV).packed
    assert SegmentTable.from_ints(packed.segments.ints) == packed.segments
    with pytest.raises(ValueError, match="7 ints per segment"):
        SegmentTable.from_ints(packed.segments.ints[:-1])


def test_meta_given_is_checked(make_layer):
    packed = make_layer(12, QKV).packed
    with pytest.raises(ValueError, match=r"meta must be \[7, 3\]"):
        PackedExpand(packed.u_flat, packed.segments, packed.meta[:, :2])


@pytest.mark.parametrize("segments,bias", [(QKV, True), (GATE_UP, False)], ids=["qkv", "gate_up"])
def test_opcheck(make_layer, segments, bias):
    """torch's own checks: schema, fake shapes, no aliasing, and tracing with dynamic shapes."""
    layer = make_layer(12, segments, bias=bias)
    args = _args(layer, torch.randn(5, 12))
    torch.library.opcheck(torch.ops.soco_lowrank.forward.default, args)
    parts = list(layer.v_cat.split([3, layer.v_cat.shape[0] - 3]))
    torch.library.opcheck(torch.ops.soco_lowrank.forward.default, (args[0], parts, *args[2:]))
    h = torch.randn(5, layer.packed.total_rank)
    torch.library.opcheck(torch.ops.soco_lowrank.expand.default,
                          (h, layer.packed.u_flat, layer.packed.meta, layer.bias, list(layer.packed.segments.ints)))


def test_expand_of_one_identity_segment_is_a_copy():
    packed = pack_expand([None], [6])
    h = torch.randn(3, 6)
    y = torch.ops.soco_lowrank.expand(h, packed.u_flat, packed.meta, None, list(packed.segments.ints))
    assert torch.equal(y, h) and y.data_ptr() != h.data_ptr()


@pytest.mark.parametrize("segments", [QKV, GATE_UP], ids=["qkv", "gate_up"])
def test_one_graph_dispatches_per_call(make_layer, monkeypatch, check_close, segments):
    """One compile serves every token count; in it the layer is one opaque op, and inside the op
    decode-sized calls reach the decode backend and larger ones the torch path, call by call.
    (On the CPU a recording stand-in takes the Triton module's place.)"""
    layer = make_layer(12, segments, bias=True)
    launched: list[int] = []

    def launch(x2d, v_cat, packed, bias):
        launched.append(x2d.shape[0])
        return forward_2d(x2d, v_cat, packed, bias)

    stand_in = types.SimpleNamespace(launch=launch)
    monkeypatch.setattr(kernel_ops, "decode_backend",
                        lambda rows, packed: stand_in if rows.shape[0] <= TRITON_MAX_TOKENS else None)
    # A fresh pack, as a layer holds it after loading (nothing derived from it computed yet).
    packed = PackedExpand(layer.packed.u_flat, layer.packed.segments)
    step, graphs = compiled_graphs(Linear(layer.v_cat, packed, layer.bias))
    # As vLLM does: the token dimension marked dynamic, traced first at a prefill size; not at
    # 1 token, which Dynamo specialises by itself (vLLM drops that guard with all others).
    for i, tokens in enumerate((TRITON_MAX_TOKENS + 37, 2, 7, TRITON_MAX_TOKENS)):
        x = torch.randn(1, tokens, 12)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 1)
        ref = lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias)
        check_close(step(x), ref)
    assert len(graphs) == 1, "a token count recompiled the graph"
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.soco_lowrank.forward in ops and not {torch.mm, torch.addmm} & set(ops)
    assert launched == [2, 7, TRITON_MAX_TOKENS]


@pytest.mark.parametrize("v_split", [None, [8, 11], [8, 8, 3]], ids=["one_v", "shared_q_own_kv", "three_parts"])
def test_torch_path_compiles(make_layer, check_close, v_split):
    """The torch path writes each segment into a column block of one output (``out=`` views),
    which Dynamo cannot trace; inside the op the whole-graph compile vLLM asks for holds, also
    with ``V`` in parts (each a Parameter of the layer, as a layer beside a shared basis holds them)."""
    layer = make_layer(12, QKV, bias=True)
    step, graphs = compiled_graphs(Linear(layer.v_cat, layer.packed, layer.bias, v_split=v_split))
    x = torch.randn(5, 12)
    check_close(step(x), lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias))
    assert len(graphs) == 1


def test_gated_torch_path(make_layer, check_close, silu_mul):
    layer = make_layer(12, GATE_UP)
    x = torch.randn(9, 12)
    gate, up = lowrank_forward_reference(x, layer.v_cat, layer.packed).split(16, dim=-1)
    check_close(silu_mul(x, layer.v_cat, layer.packed), F.silu(gate) * up)


def test_shrink_in_parts_traces(make_layer, check_close):
    """The shrink alone (row-parallel layers under TP), with V in parts, compiles as one graph."""
    layer = make_layer(12, QKV)
    parts = layer.v_cat.split([8, 11])
    fn = torch.compile(lambda x: lowrank_shrink(x, parts), backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (1, 5):
        x = torch.randn(2, tokens, 12)
        check_close(fn(x), x.double() @ layer.v_cat.double().T)
