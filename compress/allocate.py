"""Turn a target compression ratio into ranks: which matrix is stored how, at what rank.

``ratio`` is the fraction of the decoder linear layers' parameters removed. A rank-``r``
factorization of a ``[out, in]`` matrix stores ``r·(in + out)`` numbers, so it only saves memory
below the break-even rank ``in·out / (in + out)``; above it the matrix is kept dense unless
factorization is forced (full-rank checkpoints exist to test the loaders).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .models import DEFAULT_SHARED_KINDS, LinearRef, LinearSpec


class AllocationError(ValueError):
    pass


@dataclass
class Assignment:
    kind: str  # "dense" | "lowrank" | "shared"
    rank: int | None = None
    basis: str | None = None


@dataclass
class Group:
    """Layers of one matrix kind that share one basis."""

    basis_id: str
    kind: str
    members: list[LinearRef]
    rank: int


@dataclass
class Plan:
    assignments: dict[str, Assignment] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)


def lowrank_rank(d_in: int, d_out: int, ratio: float) -> int:
    """Rank that removes ``ratio`` of one matrix's parameters: ``round(in·out·(1−ratio)/(in+out))``."""
    return max(1, round(d_in * d_out * (1 - ratio) / (d_in + d_out)))


def shared_rank(d_in: int, d_out: int, n: int, ratio: float) -> int:
    """Basis Sharing's rank for a group of ``n``: ``round(in·out·n·(1−ratio)/(in + out·n))``."""
    return max(1, round(d_in * d_out * n * (1 - ratio) / (d_in + d_out * n)))


def breakeven_rank(d_in: int, d_out: int) -> int:
    """Largest rank whose two factors are strictly smaller than the dense matrix."""
    return (d_in * d_out - 1) // (d_in + d_out)


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise AllocationError(f"--ratio must be in (0, 1) (the fraction of linear parameters removed), got {ratio}")


def _lowrank_or_dense(ref: LinearRef, rank: int, force: bool) -> Assignment:
    d_in, d_out = ref.module.in_features, ref.module.out_features
    rank = min(rank, d_in, d_out)
    if not force and rank > breakeven_rank(d_in, d_out):
        return Assignment("dense")
    return Assignment("lowrank", rank)


def _shares(spec: LinearSpec, shared_kinds: tuple[str, ...]) -> bool:
    """A matrix shares a basis when its type is a shared type; a weight fused in the source (q/k/v
    in one matrix) when all of its parts are, since it is one matrix with one factorization."""
    if spec.kind in shared_kinds:
        return True
    named = [t for t in spec.parts if t in shared_kinds]
    if named and len(named) < len(spec.parts):
        raise AllocationError(f"--shared-types names {named}, but this model stores {list(spec.parts)} fused in one "
                              f"matrix ({spec.path}): name all of them or none")
    return bool(named)


def plan_ranks(refs: list[LinearRef], ratio: float, *, group_size: int = 1, shared_kinds: tuple[str, ...] = (),
               force_factorize: bool = False, full_rank: bool = False) -> Plan:
    """Uniform ranks per matrix (SVD, SVD-LLM) or per group of layers (Basis Sharing).

    Each ``shared_kinds`` matrix shares one basis across ``group_size`` adjacent
    layers (the last group may be smaller); other kinds stay private. ``full_rank`` factorizes
    everything at its full rank (``ratio`` ignored), which must reproduce the dense model.
    """
    if not full_rank:
        check_ratio(ratio)
    first, last = min(r.layer for r in refs), max(r.layer for r in refs)
    n_layers = last - first + 1
    if group_size < 1 or group_size > n_layers:
        raise AllocationError(f"--group-size must be between 1 and the model's {n_layers} layers, got {group_size}")
    plan = Plan()
    by_kind: dict[str, list[LinearRef]] = {}
    for r in refs:
        by_kind.setdefault(r.spec.kind, []).append(r)
    types = {t for members in by_kind.values() for t in (members[0].spec.kind, *members[0].spec.types)}
    unknown = set(shared_kinds) - set(DEFAULT_SHARED_KINDS) - types
    if unknown:
        raise AllocationError(f"--shared-types names {sorted(unknown)}; this model's matrix types are {sorted(types)}")
    for kind, members in by_kind.items():
        if _shares(members[0].spec, shared_kinds):
            for start in range(first, last + 1, group_size):
                grp = [r for r in members if start <= r.layer < start + group_size]
                d_in, d_out = grp[0].module.in_features, grp[0].module.out_features
                n = len(grp)
                rank = min(d_in, d_out * n) if full_rank else shared_rank(d_in, d_out, n, ratio)
                bid = f"{kind}.{grp[0].layer}-{grp[-1].layer}"
                plan.groups[bid] = Group(bid, kind, grp, rank)
                for r in grp:
                    plan.assignments[r.name] = Assignment("shared", rank, bid)
        else:
            for r in members:
                d_in, d_out = r.module.in_features, r.module.out_features
                rank = min(d_in, d_out) if full_rank else lowrank_rank(d_in, d_out, ratio)
                plan.assignments[r.name] = _lowrank_or_dense(r, rank, force_factorize or full_rank)
    return plan
