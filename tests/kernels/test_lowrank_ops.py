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

import kernels.lowrank as lowrank
from kernels import TRITON_MAX_TOKENS, lowrank_forward_reference, pack_expand
from kernels.lowrank import segments_from_table

from .conftest import Linear, compiled_graphs

QKV = [(24, 8), (8, None), (8, 3)]  # a fused q/k/v with its k kept dense
GATE_UP = [(16, 5), (16, 5)]


def _args(layer, x, gated=False):
    p = layer.packed
    return x, [layer.v_cat], p.u_flat, p.meta, layer.bias, list(p.table), gated


def test_table_round_trip(make_layer):
    packed = make_layer(12, QKV).packed
    assert segments_from_table(packed.table) == packed.segments
    with pytest.raises(ValueError, match="7 ints per segment"):
        segments_from_table(packed.table[:-1])


def test_meta_given_is_checked(make_layer):
    packed = make_layer(12, QKV).packed
    with pytest.raises(ValueError, match=r"meta must be \[7, 3\]"):
        lowrank.PackedExpand(packed.u_flat, packed.segments, packed.meta[:, :2])


@pytest.mark.parametrize("segments,gated", [(QKV, False), (GATE_UP, True)], ids=["qkv", "gate_up_silu"])
def test_opcheck(make_layer, segments, gated):
    """torch's own checks: schema, fake shapes, no aliasing, and tracing with dynamic shapes."""
    layer = make_layer(12, segments, bias=not gated)
    args = _args(layer, torch.randn(5, 12), gated)
    torch.library.opcheck(torch.ops.soco_lowrank.forward.default, args)
    parts = list(layer.v_cat.split([3, layer.v_cat.shape[0] - 3]))
    torch.library.opcheck(torch.ops.soco_lowrank.forward.default, (args[0], parts, *args[2:]))
    h = torch.randn(5, layer.packed.total_rank)
    torch.library.opcheck(torch.ops.soco_lowrank.expand.default,
                          (h, layer.packed.u_flat, layer.packed.meta, layer.bias, list(layer.packed.table)))


def test_expand_of_one_identity_segment_is_a_copy():
    packed = pack_expand([None], [6])
    h = torch.randn(3, 6)
    y = torch.ops.soco_lowrank.expand(h, packed.u_flat, packed.meta, None, list(packed.table))
    assert torch.equal(y, h) and y.data_ptr() != h.data_ptr()


@pytest.mark.parametrize("segments,gated", [(QKV, False), (GATE_UP, True)], ids=["qkv", "gate_up_silu"])
def test_one_graph_dispatches_per_call(make_layer, monkeypatch, check_close, segments, gated):
    """One compile serves every token count; in it the layer is one opaque op, and inside the op
    decode-sized calls reach the decode backend and larger ones the torch path, call by call.
    (On the CPU a recording stand-in takes the Triton module's place.)"""
    layer = make_layer(12, segments, bias=True)
    launched: list[int] = []

    def launch(x2d, v_cat, packed, bias, gated=False):
        launched.append(x2d.shape[0])
        y = lowrank._torch_forward_2d(x2d, v_cat, packed, bias)
        return F.silu(y[:, :16]) * y[:, 16:] if gated else y

    stand_in = types.SimpleNamespace(launch=launch)
    monkeypatch.setattr(lowrank, "_decode_backend",
                        lambda rows, packed: stand_in if rows.shape[0] <= TRITON_MAX_TOKENS else None)
    # A fresh pack, as a layer holds it after loading (nothing derived from it computed yet).
    packed = lowrank.PackedExpand(layer.packed.u_flat, layer.packed.segments)
    step, graphs = compiled_graphs(Linear(layer.v_cat, packed, layer.bias, gated))
    # As vLLM does: the token dimension marked dynamic, traced first at a prefill size; not at
    # 1 token, which Dynamo specialises by itself (vLLM drops that guard with all others).
    for i, tokens in enumerate((TRITON_MAX_TOKENS + 37, 2, 7, TRITON_MAX_TOKENS)):
        x = torch.randn(1, tokens, 12)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 1)
        ref = lowrank_forward_reference(x, layer.v_cat, layer.packed, layer.bias)
        if gated:
            ref = F.silu(ref[..., :16]) * ref[..., 16:]
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


def test_gated_torch_path(make_layer, check_close):
    layer = make_layer(12, GATE_UP)
    x = torch.randn(9, 12)
    gate, up = lowrank_forward_reference(x, layer.v_cat, layer.packed).split(16, dim=-1)
    check_close(torch.ops.soco_lowrank.forward(*_args(layer, x, gated=True)), F.silu(gate) * up)


def test_shrink_in_parts_traces(make_layer, check_close):
    """The shrink alone (row-parallel layers under TP), with V in parts, compiles as one graph."""
    layer = make_layer(12, QKV)
    parts = layer.v_cat.split([8, 11])
    fn = torch.compile(lambda x: lowrank.lowrank_shrink(x, parts), backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (1, 5):
        x = torch.randn(2, tokens, 12)
        check_close(fn(x), x.double() @ layer.v_cat.double().T)
