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


@pytest.mark.parametrize("rank", [1, 3, 8, 12])
def test_projected_svd_reaches_the_whitened_optimum(rank):
    # out < in: the out-sized eigenproblem gives the same least activation-weighted error as the
    # Cholesky + SVD route (the float64 reference), and the same product.
    w, _, gram = _data(out=12, inp=20, n=300)
    ref = D.whitened_svd(w, D.whitening(gram), rank)
    got = D.projected_svd(w, gram, rank)
    best = D.weighted_error(w, torch.matmul(*ref), gram)
    assert D.weighted_error(w, torch.matmul(*got), gram) <= best * (1 + 1e-9) + 1e-12
    torch.testing.assert_close(got[0] @ got[1], ref[0] @ ref[1], rtol=0, atol=1e-8)
    torch.testing.assert_close(got[0].norm(dim=0), ref[0].norm(dim=0), rtol=1e-8, atol=1e-10)  # σ^½ split alike


def test_projected_svd_needs_no_ridge_on_a_singular_gram():
    w, x, _ = _data(out=8, inp=16, n=5)  # 5 tokens for 16 features
    gram = x.T @ x
    u, v = D.projected_svd(w, gram, 5)  # rank 5 holds all of W X: the error is zero
    assert D.weighted_error(w, u @ v, gram) < 1e-9 * D.weighted_error(w, torch.zeros_like(w), gram)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    u, v = D.projected_svd(w, gram, 8)  # beyond the data's rank: components of zero σ stay finite
    assert torch.isfinite(u).all() and torch.isfinite(v).all()


def test_whitened_factors_takes_the_cheaper_exact_route():
    calls = []
    w, _, gram = _data(out=12, inp=20)
    D.whitened_factors(w, gram, 4, lambda: calls.append(1) or D.whitening(gram))
    assert calls == []  # out < in: no Cholesky factor needed
    w, _, gram = _data(out=24, inp=16)
    D.whitened_factors(w, gram, 4, lambda: calls.append(1) or D.whitening(gram))
    assert calls == [1]


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


def test_shared_spectrum_of_a_tall_stack_is_the_stacked_svd():
    """A stack taller than wide takes the in-sized eigenproblem: the same σ, the same best rank-r
    approximation of every layer as the stacked matrix's SVD, and exact at full rank."""
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(40, 16, generator=g, dtype=F64), torch.randn(24, 16, generator=g, dtype=F64)]
    _, _, gram = _data()
    wh = D.whitening(gram)
    coeffs, sigma, v = D.shared_spectrum(ws, wh)
    stacked = torch.cat(ws) @ wh.s
    u_ref, sigma_ref, vh_ref = torch.linalg.svd(stacked, full_matrices=False)
    torch.testing.assert_close(sigma, sigma_ref, rtol=1e-10, atol=0)
    u = torch.cat(coeffs)
    torch.testing.assert_close(u.T @ u, torch.eye(16, dtype=F64), rtol=0, atol=1e-9)
    for r in (1, 5, 16):
        ours = torch.cat([c[:, :r] * sigma[:r] @ v[:r] for c in coeffs]) @ wh.s
        ref = u_ref[:, :r] * sigma_ref[:r] @ vh_ref[:r]
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9 * float(sigma_ref[0]))
    for w, c in zip(ws, coeffs):
        torch.testing.assert_close(c * sigma @ v, w, rtol=0, atol=1e-10)


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


def _row_error(w, w_approx, weights):
    return float((weights[:, None] * (w - w_approx) ** 2).sum())


def test_scaled_svd_unit_scales_is_plain_svd_and_full_rank_is_exact():
    w, _, _ = _data()
    ones_in, ones_out = torch.ones(16, dtype=F64), torch.ones(24, dtype=F64)
    for rank in (3, 16):
        ref = torch.matmul(*D.truncated_svd(w, rank))
        torch.testing.assert_close(torch.matmul(*D.scaled_svd(w, rank, ones_in, ones_out)), ref, rtol=0, atol=1e-10)
    g = torch.Generator().manual_seed(2)
    s_in, s_out = torch.rand(16, generator=g, dtype=F64) + 0.1, torch.rand(24, generator=g, dtype=F64) + 0.1
    torch.testing.assert_close(torch.matmul(*D.scaled_svd(w, 16, s_in, s_out)), w, rtol=0, atol=1e-10)


def test_asvd_scaling_is_optimal_for_its_channel_weighted_error():
    # ASVD minimises ||(W - W') diag(s)||: it beats plain SVD there, and no nearby rank-r
    # candidate does better (Eckart-Young in the scaled space).
    w, x, _ = _data()
    s = D.activation_scale(x.abs().mean(0), 0.5)
    err = lambda wa: float((((w - wa) * s) ** 2).sum())  # noqa: E731
    u, v = D.scaled_svd(w, 4, in_scale=s)
    assert err(u @ v) < err(torch.matmul(*D.truncated_svd(w, 4)))
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        assert err((u + 1e-2 * torch.randn(u.shape, generator=g, dtype=F64)) @ v) >= err(u @ v) - 1e-9


def test_fwsvd_scaling_favours_rows_with_more_fisher_information():
    w, _, _ = _data()
    fisher = torch.logspace(2, -2, 24, dtype=F64)  # a few rows matter much more than the rest
    u, v = D.scaled_svd(w, 4, out_scale=D.fisher_scale(fisher))
    plain = torch.matmul(*D.truncated_svd(w, 4))
    assert _row_error(w, u @ v, fisher) < 0.9 * _row_error(w, plain, fisher)
    # the important rows are nearly exact, the unimportant ones pay for it
    assert (w - u @ v)[:3].norm() < (w - plain)[:3].norm() * 0.5


def test_scales_are_floored_and_checked():
    a = D.activation_scale(torch.tensor([0.0, 4.0, 1.0], dtype=F64), 0.5)
    torch.testing.assert_close(a, torch.tensor([1.0, 2.0, 1.0], dtype=F64))
    f = D.fisher_scale(torch.tensor([0.0, 3.0], dtype=F64))
    assert f[0] > 0 and f[1] == pytest.approx(3**0.5)
    w = torch.randn(4, 3, dtype=F64)
    with pytest.raises(D.DecompositionError, match="in_scale must be 3 positive finite values"):
        D.scaled_svd(w, 2, in_scale=torch.tensor([1.0, 0.0, 1.0], dtype=F64))
    with pytest.raises(D.DecompositionError, match="out_scale must be 4"):
        D.scaled_svd(w, 2, out_scale=torch.ones(3, dtype=F64))
