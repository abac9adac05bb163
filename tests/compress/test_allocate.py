import pytest
from torch import nn

from compress import allocate as A
from compress.models import LLAMA_LIKE, LinearRef


def _refs(n_layers=4, hidden=64, inter=160, kv=32):
    shapes = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
              "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
    return [LinearRef(f"model.layers.{i}.{s.path}", i, s, nn.Linear(*shapes[s.kind], bias=False, device="meta"))
            for i in range(n_layers) for s in LLAMA_LIKE.linears]


def _stored(plan, refs):
    by = {r.name: r.module for r in refs}
    total = 0
    for name, a in plan.assignments.items():
        m = by[name]
        if a.kind == "dense":
            total += m.in_features * m.out_features
        else:
            total += a.rank * m.out_features + (a.rank * m.in_features if a.kind == "lowrank" else 0)
    return total + sum(g.rank * g.members[0].module.in_features for g in plan.groups.values())


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_budget_is_met(ratio, group):
    refs = _refs(n_layers=6, hidden=576, inter=1536, kv=192)
    plan = A.plan_ranks(refs, ratio, group_size=group, shared_kinds=("q", "k", "v", "gate", "up") if group > 1 else ())
    dense = sum(r.module.in_features * r.module.out_features for r in refs)
    assert abs((1 - _stored(plan, refs) / dense) - ratio) < 0.005


def test_breakeven_keeps_dense_unless_forced():
    refs = _refs()
    assert A.breakeven_rank(64, 32) == 21  # 21*96 = 2016 < 2048, 22*96 = 2112 > 2048
    plan = A.plan_ranks(refs, 0.01)
    for r in refs:
        d_in, d_out = r.module.in_features, r.module.out_features
        over = A.lowrank_rank(d_in, d_out, 0.01) > A.breakeven_rank(d_in, d_out)
        assert plan.assignments[r.name].kind == ("dense" if over else "lowrank")
    assert any(a.kind == "dense" for a in plan.assignments.values())
    forced = A.plan_ranks(refs, 0.01, force_factorize=True)
    assert all(a.kind == "lowrank" for a in forced.assignments.values())
    full = A.plan_ranks(refs, 0.5, full_rank=True)
    for r in refs:
        a = full.assignments[r.name]
        assert a.kind == "lowrank" and a.rank == min(r.module.in_features, r.module.out_features)


def test_groups_store_one_basis_and_last_group_may_be_smaller():
    refs = _refs(n_layers=5)
    plan = A.plan_ranks(refs, 0.3, group_size=2, shared_kinds=("q",))
    assert sorted(g for g in plan.groups) == ["q.0-1", "q.2-3", "q.4-4"]
    assert [len(g.members) for g in plan.groups.values()] == [2, 2, 1]


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(A.AllocationError, match="--ratio must be in"):
        A.plan_ranks(_refs(), ratio)


def test_group_larger_than_layers():
    with pytest.raises(A.AllocationError, match="--group-size must be between 1 and the model's 4 layers"):
        A.plan_ranks(_refs(), 0.3, group_size=5, shared_kinds=("q",))


def test_unknown_shared_type():
    with pytest.raises(A.AllocationError, match="qkv"):
        A.plan_ranks(_refs(), 0.3, group_size=2, shared_kinds=("qkv",))
