"""The factorization math against dense references."""

import pytest
import torch

from compress import decompose as D

F64 = torch.float64


def _data(out=24, inp=16, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=F64)
    # Correlated, anisotropic inputs: what makes whitening matter.
    mix = torch.randn(inp, inp, generator=g, dtype=F64) * torch.logspace(0, -2, inp, dtype=F64)
    x = torch.randn(n, inp, generator=g, dtype=F64) @ mix
    return w, x, x.T @ x


def test_full_rank_factorizations_are_exact():
    w, _, gram = _data()
    wh = D.whitening(gram)
    for u, v in (D.truncated_svd(w, 16), D.whitened_svd(w, wh, 16)):
        torch.testing.assert_close(u @ v, w, rtol=0, atol=1e-10)


def test_whitening_beats_plain_svd_on_activation_weighted_error():
    w, _, gram = _data()
    wh = D.whitening(gram)
    for rank in (2, 4, 8):
        plain = D.weighted_error(w, torch.matmul(*D.truncated_svd(w, rank)), gram)
        white = D.weighted_error(w, torch.matmul(*D.whitened_svd(w, wh, rank)), gram)
        assert white < plain * 0.9, (rank, white, plain)


def test_whitened_svd_is_optimal_among_rank_r_perturbations():
    # Eckart-Young in the whitened space: random rank-r candidates never do better.
    w, _, gram = _data()
    wh = D.whitening(gram)
    best = D.weighted_error(w, torch.matmul(*D.whitened_svd(w, wh, 4)), gram)
    u, v = D.whitened_svd(w, wh, 4)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        cand = (u + 1e-2 * torch.randn(u.shape, generator=g, dtype=F64)) @ v
        assert D.weighted_error(w, cand, gram) >= best - 1e-9


def test_singular_gram_falls_back_to_damping():
    w, x, _ = _data(n=5)  # 5 tokens for 16 features: rank-deficient Gram
    gram = x.T @ x
    gram[3, :] = gram[:, 3] = 0  # a dead input channel
    wh = D.whitening(gram)
    assert wh.damping > 0
    u, v = D.whitened_svd(w, wh, 16)
    torch.testing.assert_close(u @ v, w, rtol=0, atol=1e-8)


def test_nan_gram_is_an_error():
    gram = torch.eye(4, dtype=F64)
    gram[0, 0] = float("nan")
    with pytest.raises(D.DecompositionError, match="NaN"):
        D.whitening(gram, name="Gram matrix of layer 0")


def test_shared_basis_full_rank_exact_and_shapes():
    ws = [torch.randn(24, 16, dtype=F64) for _ in range(3)]
    _, _, gram = _data()
    basis, coeffs = D.shared_basis(ws, D.whitening(gram), 16)
    assert basis.shape == (16, 16) and [c.shape for c in coeffs] == [(24, 16)] * 3
    for w, c in zip(ws, coeffs):
        torch.testing.assert_close(c @ basis, w, rtol=0, atol=1e-10)


def test_refit_coefficients_is_the_weighted_least_squares_solution():
    w, x, gram = _data()
    basis = torch.randn(5, 16, dtype=F64)
    u = D.refit_coefficients(w, basis, gram)
    # Least squares on the activations, plus the documented ridge as extra "inputs" sqrt(λ)·I:
    # min_U ||W Xa^T - U (V Xa^T)||
    lam = D.REFIT_RIDGE * gram.diagonal().mean()
    xa = torch.cat([x, lam.sqrt() * torch.eye(16, dtype=F64)])
    ref = torch.linalg.lstsq((basis @ xa.T).T, (w @ xa.T).T).solution.T
    torch.testing.assert_close(u, ref, rtol=1e-6, atol=1e-8)
    # and it never does worse than the coefficients the basis came with
    ws = [w, torch.randn(24, 16, dtype=F64)]
    b, cs = D.shared_basis(ws, D.whitening(gram), 6)
    before = D.weighted_error(w, cs[0] @ b, gram)
    after = D.weighted_error(w, D.refit_coefficients(w, b, gram) @ b, gram)
    assert after <= before * (1 + 1e-8)


def test_rank_out_of_range():
    with pytest.raises(D.DecompositionError, match="rank 17"):
        D.truncated_svd(torch.randn(24, 16, dtype=F64), 17)
