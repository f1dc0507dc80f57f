"""Tests for kdbook.aekd: the capped-simplex solver against the module's reference oracles (brute force, scipy,
the closed form for rank-one G) and a reference-free optimality certificate; property tests, the public code's
solver, error messages, the method's reductions, and the numbers pinned in tests/fixtures/pinned_aekd.json."""
import ast, json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kdbook.aekd
from kdbook.aekd import (AEKD, AEKDFeat, aekd_weights, brute_force_min_norm, capped_simplex_min_norm,
                         capped_simplex_projection, capped_simplex_vertices, hint_weights, min_norm_gap_bound, normalized_weights,
                         ocsvm_weights, rank_one_min_norm, scipy_min_norm, scipy_slack_primal)
from kdbook.baselines import AVER
from kdbook.core import kd_logit_grad, softmax_t
from kdbook.models import ModelOut, TeacherOut

PINNED = json.loads((Path(__file__).parent / "fixtures" / "pinned_aekd.json").read_text())


def value(G, a): return 0.5 * a @ G @ a


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
    f, floor = value(G, a), 1e-9 * np.trace(G)
    assert min_norm_gap_bound(G, a, C) <= 1e-6 * max(f, floor)   # a certificate that needs no reference
    return (f - f_ref) / max(abs(f_ref), floor)


def test_brute_force_oracle_small_M():
    rng = np.random.default_rng(0)
    worst = max(gap(G, C, value(G, brute_force_min_norm(G, C))) for G, C in (instance(rng, M) for M in [2, 3, 5] * 30))
    assert worst < 1e-6, worst


def test_scipy_oracle_large_M():
    rng = np.random.default_rng(1)
    worst = max(gap(G, C, value(G, scipy_min_norm(G, C))) for G, C in (instance(rng, M, (2, None, 3)) for M in [10] * 20 + [25] * 8))
    assert worst < 1e-6, worst


@pytest.mark.parametrize("M", [10, 25])
def test_rank_one_large_M_exact(M):
    "Collinear gradients (G = ccᵀ), with ties and C at both ends, against the closed form."
    rng = np.random.default_rng(11 + M)
    cs = [rng.normal(size=M) + rng.normal() * rng.choice([0.0, 1.0, 3.0]) for _ in range(24)]
    for c in cs[::3]: c[1] = c[0]
    cs += [np.r_[np.ones(M - 1), -3.0], np.r_[np.ones(M // 2), -np.ones(M - M // 2)], np.arange(M) % 3 + 1.0]
    Cs = (1 / M, 1 / M + 1e-3, 0.3, 0.5, 1.0)
    worst = max(gap(np.outer(c, c), C, rank_one_min_norm(c, C)) for k, c in enumerate(cs) for C in Cs[k % 2::2])
    assert worst < 1e-6, worst


@pytest.mark.parametrize("M", [10, 25])
def test_rank_two_large_M(M):
    rng = np.random.default_rng(21 + M)
    worst = max(gap(G, C, value(G, scipy_min_norm(G, C))) for G, C in (instance(rng, M, (2,)) for _ in range(12)))
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


def test_public_solver_is_inexact_on_the_codes_scale():
    "Gram entries near libsvm's tolerance (1e-6): at M = 3 libsvm returns its start (C, 1 - C, 0); times 1e6, the optimum."
    g = torch.Generator().manual_seed(11)
    for M in (3, 5):
        grads = 1e-3 * (torch.randn(M, 100, generator=g, dtype=torch.float64) + 0.5)
        G = grads @ grads.T / 100                                          # entries about 1e-6, as the code's Gram
        exact = torch.from_numpy(brute_force_min_norm(G.numpy(), 0.6))
        libsvm = ocsvm_weights(G, 0.6)
        if M == 3: torch.testing.assert_close(libsvm, torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
        assert float(libsvm @ G @ libsvm) > 1.05 * float(exact @ G @ exact)   # more than 5% above the optimum
        torch.testing.assert_close(ocsvm_weights(1e6 * G, 0.6), exact, atol=1e-3, rtol=0)


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


@pytest.mark.parametrize("gram", ["sum", "mean", "sample"])
def test_kd_gradient_is_step_to_mixture(gram):
    z, v, y = _batch()
    m = AEKD(C=0.5, gamma=0.0, alpha=1.0, gram=gram)
    out = m.loss((None, y, None), ModelOut([], None, z), TeacherOut(v, None, None))
    (gz,) = torch.autograd.grad(out["kd"], z)
    a = aekd_weights(z.detach(), v, 4.0, 0.5, gram)
    a = a[:, None] if a.dim() == 1 else a
    target = (a[..., None] * softmax_t(v, 4.0)).sum(0)
    torch.testing.assert_close(gz, 4.0 * (softmax_t(z.detach(), 4.0) - target) / 12, rtol=1e-9, atol=1e-12)
    assert m.teacher_weight_history().shape == (1, 4)
    assert float(out["weight_min"]) <= float(out["weight_max"]) <= 0.5 + 1e-6


def test_method_validation():
    z, v, y = _batch()
    with pytest.raises(ValueError, match=r"C must be in \[1/M, 1\] = \[0.25, 1\] for M=4 teachers, got C=0.2"):
        AEKD(C=0.2).loss((None, y, None), ModelOut([], None, z), TeacherOut(v, None, None))
    with pytest.raises(ValueError, match="gram must be one of 'sum', 'mean', 'sample', got 'x'"): AEKD(gram="x")
    with pytest.raises(ValueError, match="hint_form must be one of 'paper', 'code', got 'x'"): AEKDFeat(hint_form="x")
    assert AEKD().gram == "sum" and AEKDFeat().hint_form == "paper"
    assert AEKDFeat().beta == 100.0 and AEKD().beta == 0.0 and AEKD().C == 0.6 and AEKD().alpha == 0.9


def test_hint_weights_sum_to_one_and_the_paper_form_respects_the_cap():
    g = torch.Generator().manual_seed(9)
    grads = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.02], dtype=torch.float64)[:, None, None]
    for form in ("paper", "code"):
        w = hint_weights(grads, 0.5, form)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert (w >= 0).all()
    assert hint_weights(grads, 0.5, "paper").max() <= 0.5 + 1e-12 < hint_weights(grads, 0.5, "code").max()   # the code's can exceed C
    torch.testing.assert_close(hint_weights(grads, 0.5, "code"), normalized_weights(grads, 0.5))
    assert hint_weights(grads.to(torch.bfloat16), 0.5).dtype == torch.float32                # bf16 gradients: weights in float32


def test_vertices():
    for v in capped_simplex_vertices(1 / 3): np.testing.assert_allclose(v, [1 / 3] * 3, atol=1e-15)
    assert len(capped_simplex_vertices(0.4)) == 3 and len(capped_simplex_vertices(0.7)) == 6
    for v in capped_simplex_vertices(0.7): assert abs(sum(v) - 1) < 1e-12 and max(v) <= 0.7


def test_primal_equals_minus_dual():
    g = torch.Generator().manual_seed(1)
    for M, C in ((3, 0.5), (5, 0.3), (5, 1.0)):
        grads = torch.randn(M, 4, generator=g, dtype=torch.float64) + torch.randn(4, generator=g, dtype=torch.float64)
        G = grads @ grads.T
        a = capped_simplex_min_norm(G, C)
        p_val, d, v, xi = scipy_slack_primal(grads.numpy(), C)
        assert abs(p_val + float(value(G, a))) <= 1e-6
        np.testing.assert_allclose(d, -(a @ grads).numpy(), atol=1e-5)                 # Eq. 11
        assert abs(v + d @ d + C * xi.sum()) <= 1e-5                                   # Eq. 12 holds with equality


@pytest.mark.parametrize("T", [4.0, 3.0])
def test_weights_are_scale_free(T):
    "aekd_weights uses Eq. 14's gradients; kd_loss's (T² times those) give the same weights (bit for bit at T = 4)."
    z, v, _ = _batch()
    g_kd = T**2 * kd_logit_grad(z.detach(), v, T)
    sum_gram = capped_simplex_min_norm(torch.einsum("mbk,nbk->mn", g_kd, g_kd), 0.5)
    mean_gram = capped_simplex_min_norm(g_kd.mean(1) @ g_kd.mean(1).T, 0.5)
    sample_gram = capped_simplex_min_norm(torch.einsum("mbk,nbk->bmn", g_kd, g_kd), 0.5).T
    for ours, ref in ((aekd_weights(z.detach(), v, T, 0.5, "sum"), sum_gram), (aekd_weights(z.detach(), v, T, 0.5, "mean"), mean_gram),
                      (aekd_weights(z.detach(), v, T, 0.5, "sample"), sample_gram)):
        if T == 4.0: assert torch.equal(ours, ref)
        else: torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_pinned_numbers():
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)
    p = PINNED["solver"]; grads = f64(p["grads"])
    torch.testing.assert_close(capped_simplex_min_norm(grads @ grads.transpose(1, 2), p["C"]), f64(p["weights"]), rtol=0, atol=1e-9)
    p = PINNED["aekd_weights"]; z, v = f64(p["s_logits"]), f64(p["t_logits"])
    for gram in ("sum", "mean", "sample"):
        torch.testing.assert_close(aekd_weights(z, v, p["T"], p["C"], gram), f64(p[gram]), rtol=0, atol=1e-9)
    p = PINNED["aekd_loss"]
    out = AEKD(C=p["C"], gram=p["gram"]).loss((None, torch.tensor(p["labels"]), None), ModelOut([], None, z), TeacherOut(v, None, None))
    for k in ("loss", "kd", "ce"): assert abs(float(out[k]) - p[k]) <= 1e-9, k
    for k in ("weight_max", "weight_min"): assert abs(float(out[k]) - p[k]) <= 1e-7, k   # logged in float32
    p = PINNED["normalized_weights"]
    torch.testing.assert_close(normalized_weights(f64(p["grads"]), p["C"]), f64(p["weights"]), rtol=0, atol=1e-9)


def test_no_long_functions():
    "The chapter's functions stay small (at most 60 lines each)."
    tree = ast.parse(Path(kdbook.aekd.__file__).read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_teacher_weights_never_called_alpha():
    assert not hasattr(AEKD, "alpha_history") and not hasattr(kdbook.aekd, "logit_grads")
    z, v, y = _batch()
    out = AEKD(C=0.5).loss((None, y, None), ModelOut([], None, z), TeacherOut(v, None, None))
    assert {"weight_max", "weight_min"} <= set(out) and not any(k.startswith("alpha") for k in out)
