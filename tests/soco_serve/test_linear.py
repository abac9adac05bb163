"""How a fused low-rank layer holds its shrink rows: the plan of shrink parts (a pure function).

The layers themselves run behind a real server (test_server.py); this pins the plan they follow.
"""

from __future__ import annotations

import pytest

from soco_serve.layout import LinearEntry
from soco_serve.linear import SegmentSpec, ShrinkPart, plan_shrink_parts


def _segments(*kinds: str) -> list[SegmentSpec]:
    """One segment per kind ('shared:<basis>', 'lowrank' or 'dense'), named like q/k/v parts."""
    out = []
    for j, kind in enumerate(kinds):
        kind, _, basis = kind.partition(":")
        entry = LinearEntry(kind, 16, 16, None if kind == "dense" else 4, basis or None)
        out.append(SegmentSpec(f"model.layers.0.self_attn.{'qkv'[j]}_proj", entry))
    return out


@pytest.mark.parametrize(
    "kinds,parts",
    [
        (["lowrank", "lowrank", "dense"], [ShrinkPart((0, 1, 2), None)]),
        (["shared:q.0-1", "shared:k.0-1", "shared:v.0-1"], [ShrinkPart((0, 1, 2), ("q.0-1", "k.0-1", "v.0-1"))]),
        (["shared:q.0-1", "dense", "dense"], [ShrinkPart((0,), ("q.0-1",)), ShrinkPart((1, 2), None)]),
        (["lowrank", "shared:k.2-3", "lowrank"],
         [ShrinkPart((0,), None), ShrinkPart((1,), ("k.2-3",)), ShrinkPart((2,), None)]),
    ],
    ids=["own", "all_shared", "shared_q_dense_kv", "private_shared_private"],
)
def test_runs_of_shared_and_own_segments(kinds, parts):
    assert plan_shrink_parts(_segments(*kinds)) == parts


def test_each_segment_names_the_tensor_of_its_rows():
    q, k, v = _segments("shared:q.0-1", "lowrank", "dense")
    assert (q.shrink_tensor, k.shrink_tensor, v.shrink_tensor) == (
        "soco_bases.q.0-1", "model.layers.0.self_attn.k_proj.lowrank_v", "model.layers.0.self_attn.v_proj.weight")
