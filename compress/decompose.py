"""The math of low-rank factorization: small pure functions on tensors, float64 inside.

Conventions (torch's): ``W`` is ``[out, in]``, ``y = W x``, a rank-``r`` factorization is
``W ≈ U V`` with ``U [out, r]`` and ``V [r, in]``. ``G = Σ x xᵀ`` is the input Gram matrix
``[in, in]``; the activation-weighted error of ``W'`` is ``‖(W − W') X‖²_F = tr((W−W') G (W−W')ᵀ)``.

SVD-LLM: with ``G = S Sᵀ`` (Cholesky), ``‖(W − W')X‖_F = ‖(W − W') S‖_F``, so truncating the SVD
of ``W S`` and multiplying back by ``S⁻¹`` gives the factors with the least activation-weighted
error (Eckart–Young on ``W S``).

Basis Sharing: the weights of a group of layers stacked along ``out`` share one input-side basis
``V`` (their inputs differ, but their row spaces are alike); each layer keeps its own ``U``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

F64 = torch.float64
DAMPING_START = 1e-8  # relative to mean(diag(G)); grown ×10 until Cholesky succeeds
DAMPING_MAX = 1e-1


class DecompositionError(ValueError):
    pass


@dataclass
class Whitening:
    """``S`` lower-triangular with ``S Sᵀ = G + damping·mean(diag G)·I``."""

    s: torch.Tensor
    damping: float  # 0.0 when G itself was positive definite


def whitening(gram: torch.Tensor, name: str = "Gram matrix") -> Whitening:
    """Cholesky factor of the Gram matrix, with a documented fallback.

    ``XᵀX`` is only positive semi-definite: dead input channels or fewer calibration tokens than
    input features make it singular. Then a ridge ``λ·mean(diag G)·I`` is added, ``λ`` starting at
    1e-8 and growing ×10 up to 1e-1, and the smallest ``λ`` that factors is used (and reported).
    Any invertible ``S`` keeps full-rank reconstruction exact; the ridge only slightly reweights
    what truncation keeps.
    """
    g = gram.to(F64)
    if not torch.isfinite(g).all():
        raise DecompositionError(f"{name} contains NaN or Inf")
    s, info = torch.linalg.cholesky_ex(g)
    if info == 0:
        return Whitening(s, 0.0)
    scale = g.diagonal().mean().clamp_min(torch.finfo(F64).tiny)
    eye = torch.eye(g.shape[0], dtype=F64, device=g.device)
    lam = DAMPING_START
    while lam <= DAMPING_MAX:
        s, info = torch.linalg.cholesky_ex(g + lam * scale * eye)
        if info == 0:
            return Whitening(s, lam)
        lam *= 10
    raise DecompositionError(f"{name} is not positive definite even with damping {DAMPING_MAX}")


class Whitenings:
    """Whitening factors computed once per key (a site, or a group's sites), with the ridge used
    recorded in :attr:`damping` where one was needed."""

    def __init__(self) -> None:
        self._cache: dict[object, Whitening] = {}
        self.damping: dict[str, float] = {}

    def get(self, key: object, gram: torch.Tensor) -> Whitening:
        if key not in self._cache:
            wh = whitening(gram, name=f"Gram matrix of {key}")
            self._cache[key] = wh
            if wh.damping:
                self.damping[str(key)] = wh.damping
        return self._cache[key]


def _split_sigma(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = sigma[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _check_rank(w: torch.Tensor, rank: int) -> None:
    if not 1 <= rank <= min(w.shape):
        raise DecompositionError(f"rank {rank} outside [1, {min(w.shape)}] for a {list(w.shape)} matrix")


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain SVD truncation: least ``‖W − UV‖_F``, blind to the inputs."""
    _check_rank(w, rank)
    u, sigma, vh = torch.linalg.svd(w.to(F64), full_matrices=False)
    return _split_sigma(u, sigma, vh, rank)


def scaled_svd(w: torch.Tensor, rank: int, in_scale: torch.Tensor | None = None,
               out_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate ``SVD(diag(out) · W · diag(in))`` and undo the scalings in the factors.

    A diagonal scaling is the cheap cousin of whitening: it tells the truncation which rows or
    columns matter without modelling their correlations. ASVD scales input channels by their
    activation size (least ``‖(W − W') diag(in)‖_F``); FWSVD scales output rows by the square
    root of their Fisher information (least ``Σ_i out_i² ‖W_i − W'_i‖²``). Scales must be
    positive; both default to ones (then this is :func:`truncated_svd`).
    """
    _check_rank(w, rank)
    scaled = w.to(F64)
    for name, scale, dim in (("in_scale", in_scale, 1), ("out_scale", out_scale, 0)):
        if scale is None:
            continue
        if scale.shape != (w.shape[dim],) or not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise DecompositionError(f"{name} must be {w.shape[dim]} positive finite values, got shape "
                                     f"{list(scale.shape)}")
        scaled = scaled * (scale.to(F64) if dim == 1 else scale.to(F64)[:, None])
    u, v = _split_sigma(*torch.linalg.svd(scaled, full_matrices=False), rank)
    if out_scale is not None:
        u = u / out_scale.to(F64)[:, None]
    if in_scale is not None:
        v = v / in_scale.to(F64)
    return u, v


def activation_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's input-channel scale ``mean|x|^α``; channels the calibration never excited get the
    smallest non-zero scale (a zero would make the scaling singular)."""
    a = abs_mean.to(F64)
    floor = a[a > 0].min() if bool((a > 0).any()) else torch.tensor(1.0, dtype=F64)
    return a.clamp_min(floor).pow(alpha)


FISHER_FLOOR = 1e-6  # relative to the mean row Fisher information


def fisher_scale(row_fisher: torch.Tensor) -> torch.Tensor:
    """FWSVD's row scale ``sqrt(Σ_j (∂L/∂W_ij)²)``, floored at :data:`FISHER_FLOOR` × the mean so
    that rows the loss never touched are approximated plainly rather than dropped."""
    f = row_fisher.to(F64)
    return f.clamp_min(FISHER_FLOOR * f.mean().clamp_min(torch.finfo(F64).tiny)).sqrt()


def unwhiten(vh_rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``vh_rows · S⁻¹`` by a triangular solve (never forming the inverse)."""
    return torch.linalg.solve_triangular(s.T, vh_rows.T, upper=True).T


def whitened_svd(w: torch.Tensor, wh: Whitening, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM: truncate ``SVD(W S)`` and fold ``S⁻¹`` into ``V``."""
    _check_rank(w, rank)
    u, sigma, vh = torch.linalg.svd(w.to(F64) @ wh.s, full_matrices=False)
    uf, vf = _split_sigma(u, sigma, vh, rank)
    return uf, unwhiten(vf, wh.s)


def projected_svd(w: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM's optimum without whitening: the same least ``‖(W − UV) X‖_F``, from the ``[out, out]``
    eigenproblem of ``W G Wᵀ``.

    ``W S`` has left singular vectors ``Q`` and ``σ² `` as the eigenpairs of ``W S Sᵀ Wᵀ = W G Wᵀ``,
    and its best rank-``r`` approximation is ``Q_r Q_rᵀ W S``: so ``W' = Q_r Q_rᵀ W``, split as
    ``U = Q_r σ^½``, ``V = σ^-½ Q_rᵀ W`` (exactly :func:`whitened_svd`'s factors, up to the signs
    of the singular vectors). No Cholesky factor, no triangular solve and no ridge are needed (a
    singular ``G`` is fine), and the eigenproblem is ``out``-sized: the cheaper route whenever
    ``out < in`` (k, v, and the down projection, whose ``in`` is the intermediate size).
    """
    _check_rank(w, rank)
    w64 = w.to(F64)
    m = w64 @ gram.to(F64) @ w64.T
    lam, q = torch.linalg.eigh((m + m.T) / 2)  # ascending; symmetrised against round-off
    lam, q = lam.flip(0)[:rank], q.flip(1)[:, :rank]
    tiny = lam[0].clamp_min(torch.finfo(F64).tiny) * torch.finfo(F64).eps
    root = torch.where(lam > tiny, lam.clamp_min(tiny).pow(0.25), torch.ones_like(lam))  # σ^½ (1 where σ ≈ 0)
    return q * root, (q.T @ w64) / root[:, None]


def whitened_factors(w: torch.Tensor, gram: torch.Tensor, rank: int,
                     whiten: Callable[[], Whitening]) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM's factors by the cheaper exact route: :func:`projected_svd` when ``out < in``,
    otherwise :func:`whitened_svd` with the (cached, per input site) Cholesky factor ``whiten()``."""
    if w.shape[0] < w.shape[1]:
        return projected_svd(w, gram, rank)
    return whitened_svd(w, whiten(), rank)


def whitened_spectrum(w: torch.Tensor, wh: Whitening) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All components of ``W = Σ_i σ_i u_i (v_iᵀ S⁻¹)``: returns ``(U, σ, Vᵀ S⁻¹)``, for methods
    that choose components themselves (SoCo) rather than by a fixed rank."""
    u, sigma, vh = torch.linalg.svd(w.to(F64) @ wh.s, full_matrices=False)
    return u, sigma, unwhiten(vh, wh.s)


def shared_spectrum(ws: list[torch.Tensor], wh: Whitening,
                    keep: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """All components (the first ``keep`` with ``keep``) of a group's stacked weights ``[W_1; …; W_n] = Σ_i σ_i [u_i¹; …; u_iⁿ] (v_iᵀ S⁻¹)``:
    returns ``([U_1, …, U_n], σ, Vᵀ S⁻¹)``, each ``U_j`` the rows of layer ``j`` (``[out_j, R]``).

    When the stack is taller than wide (q, gate and up of a group: ``Σ out_j > in``), the right
    singular vectors and ``σ²`` are the eigenpairs of the ``[in, in]`` matrix ``Σ_j (W_j S)ᵀ (W_j S)``
    and ``U_j = W_j S V σ⁻¹``: one layer's whitened weight at a time, never the stacked matrix, its
    whitened copy and a tall SVD's workspace, each as large as the group's weights in float64 (what
    bounds a large model's group). ``U_j σ Vᵀ = W_j S V Vᵀ`` is exact for any orthonormal ``V``, so the
    full-rank factors still reproduce every ``W_j``; squaring only costs accuracy in the directions
    of the smallest ``σ`` (about ``√eps·σ_1``), the first to be truncated.
    """
    rows, cols = sum(w.shape[0] for w in ws), ws[0].shape[1]
    if rows <= cols:
        stacked = torch.cat([w.to(F64) for w in ws], dim=0)
        u, sigma, vh = torch.linalg.svd(stacked @ wh.s, full_matrices=False)
        u, sigma, vh = u[:, :keep], sigma[:keep], vh[:keep]
        coeffs = [c.contiguous() for c in torch.split(u, [w.shape[0] for w in ws], dim=0)]
        return coeffs, sigma, unwhiten(vh, wh.s)
    m = torch.zeros(cols, cols, dtype=F64, device=wh.s.device)
    for w in ws:
        a = w.to(F64) @ wh.s
        m.addmm_(a.T, a)
        del a
    lam, v = torch.linalg.eigh((m + m.T) / 2)  # ascending; symmetrised against round-off
    del m
    lam, v = lam.flip(0)[:keep], v.flip(1)[:, :keep]  # only the kept columns are ever multiplied out
    sigma = lam.clamp_min(0).sqrt()
    inv = torch.where(sigma > sigma[0] * torch.finfo(F64).eps, 1 / sigma, torch.zeros_like(sigma))
    coeffs = [(w.to(F64) @ wh.s @ v) * inv for w in ws]
    return coeffs, sigma, unwhiten(v.T.contiguous(), wh.s)


def shared_basis(ws: list[torch.Tensor], wh: Whitening, rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Basis Sharing: one basis ``V [r, in]`` for a group, one coefficient matrix ``U_i`` per layer.

    ``wh`` whitens with the sum of the group's Gram matrices. ``σ`` goes into the basis (as in the
    paper), so the coefficients are blocks of an orthonormal ``U``.
    """
    _check_rank(torch.empty(sum(w.shape[0] for w in ws), ws[0].shape[1], device="meta"), rank)
    coeffs, sigma, v = shared_spectrum(ws, wh, keep=rank)
    return sigma[:, None] * v, coeffs


REFIT_RIDGE = 1e-6  # relative ridge on G for the coefficient update


def refit_coefficients(w: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Best ``U`` for a fixed basis ``V`` under this layer's own input statistics.

    Minimises ``tr((W − U V) G (W − U V)ᵀ)``: ``U = W G Vᵀ (V G Vᵀ)⁻¹`` (the Basis Sharing paper's
    ``C = (BᵀGB)⁻¹BᵀGW`` in torch's orientation). ``G`` gets a small relative ridge first: input
    directions the calibration never visited then fall back to plain least squares instead of
    being dropped, and a full-rank basis still reproduces ``W`` exactly (``U = W V⁻¹`` for any
    positive definite ``G``).
    """
    g = gram.to(F64)
    g = g + REFIT_RIDGE * g.diagonal().mean().clamp_min(torch.finfo(F64).tiny) * torch.eye(
        g.shape[0], dtype=F64, device=g.device)
    v = basis.to(F64)
    vg = v @ g  # [r, in]
    chol = torch.linalg.cholesky(vg @ v.T)  # [r, r], positive definite for a full-row-rank basis
    return torch.cholesky_solve((w.to(F64) @ vg.T).T, chol).T


def weighted_error(w: torch.Tensor, w_approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖(W − W') X‖²_F`` from the Gram matrix."""
    d = (w.to(F64) - w_approx.to(F64))
    return float(torch.einsum("oi,ij,oj->", d, gram.to(F64), d))
