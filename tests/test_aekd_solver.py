"""Exactness of kdbook.aekd's active-set solver against the module's oracles on the hard families (qp_families.py), for
float64 and float32 inputs and Gram scales 1e-8 to 1e8; the fixed-budget (accelerator) path, warm starts and special cases."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdbook.aekd import brute_force_min_norm, capped_simplex_min_norm, min_norm_gap_bound, rank_one_min_norm, scipy_min_norm

sys.path.insert(0, str(Path(__file__).parent))
from qp_families import instances


def value(G, a): return 0.5 * a @ G @ a


def assert_exact(G, C, a, f_ref, name, rel=1e-9, cert=1e-10):
    "Feasible, and the objective within `rel` of the reference's, or the gap certificate within `cert`·tr G."
    tr = np.trace(G)
    assert abs(a.sum() - 1) < 1e-12 and a.min() >= 0 and a.max() <= C, name
    f = value(G, a)
    assert f <= f_ref + rel * abs(f_ref) or min_norm_gap_bound(G, a, C) <= cert * tr, (name, f, f_ref)


def solve(G, C, dtype=torch.float64, **kw):
    return capped_simplex_min_norm(torch.from_numpy(G).to(dtype), C, check=False, **kw).double().numpy()


def reference(G, C):
    "The oracles on G / tr G (the brute force's residual test is absolute): enumeration for M ≤ 6, else SLSQP."
    Gn = G / np.trace(G)
    return (brute_force_min_norm if len(G) <= 6 else scipy_min_norm)(Gn, C)


@pytest.mark.parametrize("Ms", [(2, 3, 4), (5, 6), (8, 12), (25,)])
def test_families_against_oracles(Ms):
    for name, G, C in instances(sum(Ms), Ms):
        a_ref = reference(G, C)
        assert_exact(G, C, solve(G, C), value(G, a_ref), name)


@pytest.mark.parametrize("M", [3, 10, 25])
def test_rank_one_closed_form(M):
    "G = ccᵀ with c of one sign or of mixed signs, against the closed form."
    rng = np.random.default_rng(M)
    for name, c in [("pos", np.abs(rng.normal(size=M)) + 0.1), ("mixed", rng.normal(size=M)),
                    ("one negative", np.r_[np.ones(M - 1), -3.0]), ("ties", np.arange(M) % 3 + 1.0)]:
        for C in (1 / M + 1e-12, 1.5 / M, 0.6, 1.0):
            C = max(C, 1 / M)
            assert_exact(np.outer(c, c), C, solve(np.outer(c, c), C), rank_one_min_norm(c, C), f"{name} C={C}")


def test_float32_inputs():
    "float32 in, float32 out: the float64 solution of the same (float32) Gram, rounded."
    for name, G, C in instances(7, (3, 5, 12)):
        G32 = torch.from_numpy(G).float()
        a = capped_simplex_min_norm(G32, C, check=False)
        assert a.dtype == torch.float32, name
        assert torch.equal(a, capped_simplex_min_norm(G32.double(), C, check=False).float()), name
        # a float32 Gram is PSD only up to its rounding (eigenvalues down to -1e-7·tr G), so exact to that level
        Gd = G32.double().numpy()
        assert value(Gd, solve(Gd, C)) <= value(Gd, reference(Gd, C)) + 1e-7 * np.trace(Gd), name


def test_fixed_budget_path():
    "Without early stopping (the accelerator path) the default budget reaches the same answers."
    for name, G, C in instances(3, (2, 5, 12, 25), scales=(1.0,)):
        a_stop, a_budget = solve(G, C, early_stop=True), solve(G, C, early_stop=False)
        assert abs(value(G, a_stop) - value(G, a_budget)) <= 1e-12 * np.trace(G), name


@pytest.mark.parametrize("M", [5, 25])
def test_warm_start(M):
    "From any start (last step's float32 weights, a vertex, a point off the set) the answer is the same."
    g = torch.Generator().manual_seed(M)
    V = torch.randn(32, M, 10, generator=g, dtype=torch.float64)
    G, C = V @ V.mT, 0.6
    cold = capped_simplex_min_norm(G, C)
    f = lambda a: 0.5 * torch.einsum("bm,bmn,bn->b", a, G, a)
    vertex = torch.zeros(32, M, dtype=torch.float64)
    vertex[:, 0], vertex[:, 1] = C, 1 - C
    for a0 in (cold.float(), vertex, torch.rand(32, M, generator=g, dtype=torch.float64), torch.ones(M)):
        warm = capped_simplex_min_norm(G, C, a0=a0)
        assert (f(warm) - f(cold)).abs().max() <= 1e-12 * torch.diagonal(G, dim1=1, dim2=2).sum(1).max()


def test_batched_equals_one_by_one():
    G = np.stack([G for _, G, _ in instances(5, (6,), scales=(1.0,))])
    batched = capped_simplex_min_norm(torch.from_numpy(G), 0.5, check=False).numpy()
    for Gi, ai in zip(G, batched): assert abs(value(Gi, ai) - value(Gi, solve(Gi, 0.5))) <= 1e-12 * np.trace(Gi)


def test_special_cases():
    G = torch.tensor([[1.0, 0.3, 0.2], [0.3, 2.0, 0.1], [0.2, 0.1, 1.5]], dtype=torch.float64)
    assert torch.equal(capped_simplex_min_norm(G, 1 / 3), torch.full((3,), 1 / 3, dtype=torch.float64))
    opp = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(capped_simplex_min_norm(opp, 1.0), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert capped_simplex_min_norm(torch.zeros(4, 4), 0.5).tolist() == [0.25] * 4      # G = 0: every point is optimal
    with pytest.raises(ValueError, match="C must be in"): capped_simplex_min_norm(G, 0.2)
    with pytest.raises(ValueError, match="semi-definite"): capped_simplex_min_norm(-G, 0.5)
