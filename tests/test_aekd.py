"""Tests for kdbook.aekd: the capped-simplex solver against a brute-force oracle, scipy, the closed form for
rank-one G and a reference-free optimality certificate; property tests, the public code's solver, error
messages, and the method's reductions."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import Bounds, LinearConstraint, minimize

from kdbook.aekd import (AEKD, AEKDFeat, aekd_weights, capped_simplex_min_norm, capped_simplex_projection,
                         capped_simplex_vertices, normalized_weights, ocsvm_weights)
from kdbook.baselines import AVER
from kdbook.core import softmax_t
from kdbook.models import ModelOut, TeacherOut


def brute_force(G, C):
    "Best feasible KKT point over all faces (each coordinate at 0, at C, or free)."
    M = len(G); best = np.inf
    for lab in itertools.product((0, 1, 2), repeat=M):
        lab = np.array(lab); free = lab == 2
        a = np.where(lab == 1, C, 0.0); nf = int(free.sum())
        if nf == 0:
            if abs(a.sum() - 1) > 1e-9: continue
        else:
            A = np.zeros((nf + 1, nf + 1)); A[:nf, :nf] = G[np.ix_(free, free)]; A[:nf, nf] = -1; A[nf, :nf] = 1
            rhs = np.concatenate([-G[np.ix_(free, ~free)] @ a[~free], [1 - a.sum()]])
            sol = np.linalg.lstsq(A, rhs, rcond=None)[0]
            if np.abs(A @ sol - rhs).max() > 1e-8: continue
            a[free] = sol[:nf]
        if a.min() < -1e-9 or a.max() > C + 1e-9: continue
        best = min(best, 0.5 * a @ G @ a)
    return best


def feasible(a, C, tol=1e-9): return abs(a.sum() - 1) <= tol and a.min() >= -tol and a.max() <= C + tol


def scipy_ref(G, C):
    "SLSQP with tight tolerances; where its point is infeasible (it happens with C near 1/M), trust-constr."
    M = len(G)
    f, jac = (lambda a: 0.5 * a @ G @ a), (lambda a: G @ a)
    r = minimize(f, np.full(M, 1 / M), jac=jac, bounds=[(0, C)] * M, method="SLSQP",
                 constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(M)}],
                 options=dict(ftol=1e-16, maxiter=2000))
    if not feasible(r.x, C):
        r = minimize(f, np.full(M, 1 / M), jac=jac, hess=lambda a: G, method="trust-constr",
                     constraints=[LinearConstraint(np.ones((1, M)), 1, 1)], bounds=Bounds(0, C),
                     options=dict(gtol=1e-14, xtol=1e-14, maxiter=5000))
    assert feasible(r.x, C), "no scipy method returned a feasible point"
    return f(r.x)


def lin_min(v, C):
    "min of vᵀβ over the capped simplex: fill the smallest entries of v with C each."
    return float(np.clip(1 - C * np.arange(len(v)), 0, C) @ np.sort(v))


def rank_one_exact(c, C):
    "min ½(cᵀα)² over the capped simplex in closed form: 0 if cᵀα takes both signs there, else the extreme nearest 0."
    lo, hi = lin_min(c, C), -lin_min(-c, C)
    return 0.0 if lo <= 0 <= hi else 0.5 * min(lo * lo, hi * hi)


def instance(rng, M, ks=(1, 2, None, 3)):
    "Random Gram matrices: rank one, rank two, full rank; with a common component or not; sometimes identical rows."
    K = int(rng.choice([1 if k == 1 else 2 if k == 2 else M if k is None else 3 * M for k in ks]))
    g = rng.normal(size=(M, K)) + rng.normal(size=K) * rng.choice([0.0, 1.0, 3.0])
    if rng.random() < 0.3: g[1] = g[0]
    C = float(rng.choice([1 / M, 1 / M + 1e-3, 0.3, 0.5, 0.7, 1.0]))
    return g @ g.T, max(C, 1 / M)


def gap(G, C, f_ref):
    "Relative objective gap to f_ref (floor 1e-9·tr G), after checking feasibility and the Frank-Wolfe certificate."
    a = capped_simplex_min_norm(torch.from_numpy(G), C).numpy()
    assert abs(a.sum() - 1) < 1e-12 and a.min() >= 0 and a.max() <= C + 1e-15
    f, floor = 0.5 * a @ G @ a, 1e-9 * np.trace(G)
    g = G @ a
    # f - f* ≤ gᵀα - min_β gᵀβ (convexity) and f - f* ≤ f (f* ≥ 0): a certificate that needs no reference
    assert min(g @ a - lin_min(g, C), f) <= 1e-6 * max(f, floor)
    return (f - f_ref) / max(abs(f_ref), floor)


def test_brute_force_oracle_small_M():
    rng = np.random.default_rng(0)
    worst = max(gap(G, C, brute_force(G, C)) for G, C in (instance(rng, M) for M in [2, 3, 5] * 30))
    assert worst < 1e-6, worst


def test_scipy_oracle_large_M():
    rng = np.random.default_rng(1)
    worst = max(gap(G, C, scipy_ref(G, C)) for G, C in (instance(rng, M, (2, None, 3)) for M in [10] * 20 + [25] * 8))
    assert worst < 1e-6, worst


@pytest.mark.parametrize("M", [10, 25])
def test_rank_one_large_M_exact(M):
    "Collinear gradients (G = ccᵀ), with ties and C at both ends, against the closed form."
    rng = np.random.default_rng(11 + M)
    cs = [rng.normal(size=M) + rng.normal() * rng.choice([0.0, 1.0, 3.0]) for _ in range(24)]
    for c in cs[::3]: c[1] = c[0]
    cs += [np.r_[np.ones(M - 1), -3.0], np.r_[np.ones(M // 2), -np.ones(M - M // 2)], np.arange(M) % 3 + 1.0]
    Cs = (1 / M, 1 / M + 1e-3, 0.3, 0.5, 1.0)
    worst = max(gap(np.outer(c, c), C, rank_one_exact(c, C)) for k, c in enumerate(cs) for C in Cs[k % 2::2])
    assert worst < 1e-6, worst


@pytest.mark.parametrize("M", [10, 25])
def test_rank_two_large_M(M):
    rng = np.random.default_rng(21 + M)
    worst = max(gap(G, C, scipy_ref(G, C)) for G, C in (instance(rng, M, (2,)) for _ in range(12)))
    assert worst < 1e-6, worst


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(2)
    g = torch.from_numpy(rng.normal(size=(20, 5, 4)))
    G = g @ g.transpose(1, 2)
    batched = capped_simplex_min_norm(G, 0.4)
    single = torch.stack([capped_simplex_min_norm(Gi, 0.4) for Gi in G])
    f = lambda a: 0.5 * torch.einsum("bm,bmn,bn->b", a, G, a)
    torch.testing.assert_close(f(batched), f(single), rtol=1e-9, atol=1e-12)


def test_special_cases():
    G = torch.tensor([[1.0, 0.3, 0.2], [0.3, 2.0, 0.1], [0.2, 0.1, 1.5]], dtype=torch.float64)
    assert torch.equal(capped_simplex_min_norm(G, 1 / 3), torch.full((3,), 1 / 3, dtype=torch.float64))
    opp = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(capped_simplex_min_norm(opp, 1.0), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert capped_simplex_min_norm(G.float(), 0.5).dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(M=st.integers(2, 8), K=st.integers(1, 10), c=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_properties(M, K, c, seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(M, K, generator=g, dtype=torch.float64)
    G = grads @ grads.T
    C = 1 / M + c * (1 - 1 / M)
    a = capped_simplex_min_norm(G, C)
    assert abs(float(a.sum()) - 1) < 1e-12 and float(a.min()) >= 0 and float(a.max()) <= C + 1e-15
    f = lambda w: 0.5 * float(w @ G @ w)
    tol = 1e-12 * float(G.trace())
    assert f(a) <= f(torch.full((M,), 1 / M, dtype=torch.float64)) + tol
    for w in capped_simplex_projection(3 * torch.randn(10, M, generator=g, dtype=torch.float64), C):
        assert f(a) <= f(w) + tol


def test_projection_properties():
    g = torch.Generator().manual_seed(3)
    v = 3 * torch.randn(100, 6, generator=g, dtype=torch.float64)
    a = capped_simplex_projection(v, 0.3)
    torch.testing.assert_close(a.sum(-1), torch.ones(100, dtype=torch.float64))
    torch.testing.assert_close(capped_simplex_projection(a, 0.3), a)


def test_public_solver_agrees():
    g = torch.Generator().manual_seed(4)
    for M, C in ((3, 0.6), (5, 0.3), (5, 1.0), (8, 0.25)):
        grads = torch.randn(M, 30, generator=g, dtype=torch.float64) + torch.randn(30, generator=g, dtype=torch.float64)
        G = grads @ grads.T
        torch.testing.assert_close(ocsvm_weights(G, C), capped_simplex_min_norm(G, C), atol=1e-3, rtol=0)


@pytest.mark.parametrize("C,msg", [(0.2, "C must be in [1/M, 1] = [0.333333, 1] for M=3 teachers, got C=0.2"),
                                   (1.5, "got C=1.5"), (float("nan"), "got C=nan")])
def test_bad_cap(C, msg):
    with pytest.raises(ValueError) as e: capped_simplex_min_norm(torch.eye(3, dtype=torch.float64), C)
    assert msg in str(e.value)


@pytest.mark.parametrize("G,msg", [(torch.ones(3, 2), "G must be square"),
                                   (torch.eye(3) * float("inf"), "G must be finite"),
                                   (torch.eye(3) + torch.triu(torch.ones(3, 3), 1), "G must be symmetric"),
                                   (-torch.eye(3), "smallest eigenvalue -1")])
def test_bad_gram(G, msg):
    with pytest.raises(ValueError) as e: capped_simplex_min_norm(G, 0.5)
    assert msg in str(e.value)


def _batch(M=4, B=12, K=10, seed=8):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, K, generator=g, dtype=torch.float64).requires_grad_()
    v = 3 * torch.randn(M, B, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    return z, v, y


def test_aekd_reduces_to_aver():
    z, v, y = _batch()
    s, t = ModelOut([], None, z), TeacherOut(v, None, None)
    assert torch.equal(AEKD(C=0.25, gamma=0.5, alpha=0.7).loss((None, y, None), s, t)["loss"].detach(),
                       AVER(4.0, 0.5, 0.7).loss((None, y, None), s, t)["loss"].detach())


@pytest.mark.parametrize("gran", ["batch", "sample"])
def test_kd_gradient_is_step_to_mixture(gran):
    z, v, y = _batch()
    m = AEKD(C=0.5, gamma=0.0, alpha=1.0, granularity=gran)
    out = m.loss((None, y, None), ModelOut([], None, z), TeacherOut(v, None, None))
    (gz,) = torch.autograd.grad(out["kd"], z)
    a = aekd_weights(z.detach(), v, 4.0, 0.5, gran)
    a = a[:, None] if a.dim() == 1 else a
    target = (a[..., None] * softmax_t(v, 4.0)).sum(0)
    torch.testing.assert_close(gz, 4.0 * (softmax_t(z.detach(), 4.0) - target) / 12, rtol=1e-9, atol=1e-12)
    assert m.alpha_history().shape == (1, 4)


def test_method_validation():
    z, v, y = _batch()
    with pytest.raises(ValueError, match=r"C must be in \[1/M, 1\] = \[0.25, 1\] for M=4 teachers, got C=0.2"):
        AEKD(C=0.2).loss((None, y, None), ModelOut([], None, z), TeacherOut(v, None, None))
    with pytest.raises(ValueError, match="granularity must be 'batch' or 'sample'"): AEKD(granularity="x")
    assert AEKDFeat().beta == 100.0 and AEKD().beta == 0.0 and AEKD().C == 0.6 and AEKD().alpha == 0.9


def test_normalized_weights_sum_to_one():
    g = torch.Generator().manual_seed(9)
    grads = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64)[:, None, None]
    w = normalized_weights(grads, 0.5)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (w > 0).all()


def test_vertices():
    for v in capped_simplex_vertices(1 / 3): np.testing.assert_allclose(v, [1 / 3] * 3, atol=1e-15)
    assert len(capped_simplex_vertices(0.4)) == 3 and len(capped_simplex_vertices(0.7)) == 6
    for v in capped_simplex_vertices(0.7): assert abs(sum(v) - 1) < 1e-12 and max(v) <= 0.7
