"""The numbers the papers define, each against an independent computation in float64 (written out from
the formula, brute force, autograd or a scipy oracle), on inputs where every setting matters: T ≠ 1, K ≠ C,
M ≥ 3 teachers, uneven weights, non-default γ, α, β, non-unit BatchNorm statistics and ε, schedules read
between epochs."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbook.core import (ce_kd_loss, kd_logit_grad, kd_loss, logit_matching_loss, multi_teacher_kd_loss,
                         soft_cross_entropy)
from kdbook.models import ModelOut, TeacherOut

F64 = torch.float64


def rand(g, *shape, scale=1.0): return scale * torch.randn(*shape, generator=g, dtype=F64)


def softmax_np(z: np.ndarray, T: float) -> np.ndarray:
    e = np.exp(z / T - (z / T).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl_np(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    "KL(p ‖ q) over the last axis."
    return (p * (np.log(p) - np.log(q))).sum(-1)


# ------------------------------------------------------------------------------------------------ chapter 00
def test_core_losses_written_out():
    "T = 2.5, B = 6 samples, K = 7 classes, M = 3 teachers with per-sample weights, α = 0.3."
    g = torch.Generator().manual_seed(0)
    T, z, v = 2.5, rand(g, 6, 7, scale=2), rand(g, 3, 6, 7, scale=3)
    y = torch.randint(0, 7, (6,), generator=g)
    zn, vn = z.numpy(), v.numpy()
    kl = T * T * kl_np(softmax_np(vn[0], T), softmax_np(zn, T))             # Hinton: T²·KL(p_t ‖ p_s)
    assert np.allclose(kd_loss(z, v[0], T, "none").numpy(), kl, rtol=1e-12)
    assert math.isclose(float(kd_loss(z, v[0], T)), kl.mean(), rel_tol=1e-12)
    assert math.isclose(float(kd_loss(z, v[0], T, "sum")), kl.sum(), rel_tol=1e-12)
    q = softmax_np(vn[1], 1.7)
    ce_soft = -(q * np.log(softmax_np(zn, T))).sum(-1).mean()                            # Eq. 2, no T²
    assert math.isclose(float(soft_cross_entropy(z, torch.from_numpy(q), T)), ce_soft, rel_tol=1e-12)
    w = torch.rand(3, 6, generator=g, dtype=F64)                              # per teacher and sample
    per = np.stack([T * T * kl_np(softmax_np(vn[m], T), softmax_np(zn, T)) for m in range(3)])
    want = (w.numpy() * per).sum(0).mean()
    assert math.isclose(float(multi_teacher_kd_loss(z, v, w, T)), want, rel_tol=1e-12)
    assert math.isclose(float(multi_teacher_kd_loss(z, v, None, T)), per.mean(), rel_tol=1e-12)   # AVER: 1/M
    ce = -np.log(softmax_np(zn, 1.0)[np.arange(6), y.numpy()]).mean()
    assert math.isclose(float(ce_kd_loss(z, v[0], y, 0.3, T)), 0.7 * ce + 0.3 * kl.mean(), rel_tol=1e-12)
    assert np.allclose(logit_matching_loss(z, v[0]).numpy(), ((zn - vn[0]) ** 2).sum(-1) / 14, rtol=1e-12)


def test_kd_logit_grad_is_autograd_of_the_unscaled_cross_entropy():
    g = torch.Generator().manual_seed(1)
    T, z, v = 3.0, rand(g, 5, 4, scale=2).requires_grad_(), rand(g, 5, 4, scale=3)
    H = -(torch.softmax(v / T, -1) * torch.log_softmax(z / T, -1)).sum()
    (grad,) = torch.autograd.grad(H, z)
    torch.testing.assert_close(kd_logit_grad(z.detach(), v, T), grad, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------ chapter 04
def test_baseline_teacher_weights_written_out():
    "EBKD: (1 − H_m / Σ_j H_j)/(M − 1), H at T = 1; CA-MKD: (1 − softmax_m(CE_m))/(M − 1), CE on the labels; "
    "M = 4."
    from kdbook.baselines import confidence_weights, entropy_weights, label_cross_entropy
    g = torch.Generator().manual_seed(2)
    v, y = rand(g, 4, 9, 6, scale=2), torch.randint(0, 6, (9,), generator=g)
    p = softmax_np(v.numpy(), 1.0)
    H = -(p * np.log(p)).sum(-1)
    assert np.allclose(entropy_weights(v).numpy(), (1 - H / H.sum(0)) / 3, rtol=1e-12)
    ce = -np.log(p[:, np.arange(9), y.numpy()])
    assert np.allclose(label_cross_entropy(v, y).numpy(), ce, rtol=1e-12)
    e = np.exp(ce - ce.max(0))
    w = confidence_weights(label_cross_entropy(v, y)).numpy()
    assert np.allclose(w, (1 - e / e.sum(0)) / 3, rtol=1e-12)


@pytest.mark.parametrize("name", ["aver", "ebkd", "camkd"])
def test_multi_teacher_loss_weighs_its_terms(name):
    "γ = 0.4, α = 0.7, T = 2: loss = γ·CE + α·mean_b Σ_m w_mb T²·KL_mb, with the method's own weights written"
    " out above."
    from kdbook.baselines import AVER, CAMKD, EBKD
    g = torch.Generator().manual_seed(3)
    z, v, y = rand(g, 8, 6, scale=2), rand(g, 3, 8, 6, scale=2), torch.randint(0, 6, (8,), generator=g)
    m = {"aver": AVER, "ebkd": EBKD, "camkd": CAMKD}[name](T=2.0, gamma=0.4, alpha=0.7, beta=0.0)
    out = m.loss((None, y, None), ModelOut([], None, z), TeacherOut(v, None, None))
    p = softmax_np(v.numpy(), 1.0)
    if name == "aver": w = np.full((3, 8), 1 / 3)
    elif name == "ebkd":
        H = -(p * np.log(p)).sum(-1); w = (1 - H / H.sum(0)) / 2
    else:
        ce_t = -np.log(p[:, np.arange(8), y.numpy()])
        e = np.exp(ce_t - ce_t.max(0)); w = (1 - e / e.sum(0)) / 2
    per = np.stack([4.0 * kl_np(softmax_np(v.numpy()[k], 2.0), softmax_np(z.numpy(), 2.0)) for k in range(3)])
    ce = -np.log(softmax_np(z.numpy(), 1.0)[np.arange(8), y.numpy()]).mean()
    assert math.isclose(float(out["kd"]), (w * per).sum(0).mean(), rel_tol=1e-12)
    assert math.isclose(float(out["loss"]), 0.4 * ce + 0.7 * (w * per).sum(0).mean(), rel_tol=1e-12)


def test_feature_terms_of_fitnet_and_camkd():
    "FitNet-MKD: the mean over teachers of each regressed map's MSE; CA-MKD: Σ_m w_mb·MSE_mb averaged over "
    "samples, w from each teacher's head on its regressed map (confidence weights written out); and β enters "
    "the loss."
    from kdbook.baselines import CAMKD, FeatureRegressor, FitNetMKD
    g = torch.Generator().manual_seed(4)
    B, M = 6, 3
    z, v, y = rand(g, B, 5), rand(g, M, B, 5), torch.randint(0, 5, (B,), generator=g)
    fs, fts = rand(g, B, 4, 3, 3), [rand(g, B, c, 3, 3) for c in (2, 5, 3)]
    torch.manual_seed(0)
    regs = nn.ModuleList(FeatureRegressor(4, c, (3, 3)).double() for c in (2, 5, 3)).eval()   # BN: running
    heads = [nn.Linear(c, 5).double() for c in (2, 5, 3)]
    s, t = ModelOut([fs], None, z), TeacherOut(v, [[f] for f in fts], None)
    with torch.no_grad():
        rs = [r(fs) for r in regs]
        mse = np.stack([((r - f) ** 2).flatten(1).mean(1).numpy() for r, f in zip(rs, fts)])   # [M, B]
        o = np.stack([h(r.mean((2, 3))).numpy() for h, r in zip(heads, rs)])
    ce_o = -np.log(softmax_np(o, 1.0)[:, np.arange(B), y.numpy()])
    e = np.exp(ce_o - ce_o.max(0))
    w = (1 - e / e.sum(0)) / (M - 1)
    for cls, want in ((FitNetMKD, mse.mean()), (CAMKD, (w * mse).sum(0).mean())):
        m = cls(beta=7.0)
        m.regressors, m.heads = regs, [lambda f, h=h: h(f.mean((2, 3))) for h in heads]
        m.eval()
        out = m.loss((None, y, None), s, t)
        assert math.isclose(float(out["feat"].detach()), want, rel_tol=1e-12), cls.name
        rest = float((out["ce"] + out["kd"]).detach())
        assert math.isclose(float(out["loss"].detach()), rest + 7.0 * want, rel_tol=1e-12), cls.name


# ------------------------------------------------------------------------------------------------ chapter 10
def test_aekd_weights_are_the_min_norm_point_of_autograd_gradients():
    "M = 4 teachers, K = 5 classes, T = 2.5, C = 0.45: per-sample gradients of H(p_t^T, p_s^T) by autograd, "
    "their Gram summed over the batch (Eq. 13) or of the batch means (the code), the capped min-norm point by"
    " enumerating the faces."
    from kdbook.aekd import aekd_weights, brute_force_min_norm
    g = torch.Generator().manual_seed(5)
    z, v = rand(g, 7, 5, scale=2), rand(g, 4, 7, 5, scale=3)
    grads = []
    for m in range(4):
        zz = z.clone().requires_grad_()
        H = -(torch.softmax(v[m] / 2.5, -1) * torch.log_softmax(zz / 2.5, -1)).sum()
        (gz,) = torch.autograd.grad(H, zz)
        grads.append(gz.numpy())
    gr = np.stack(grads)                                                                  # [M, B, K]
    for gram, G in (("sum", np.einsum("mbk,nbk->mn", gr, gr)), ("mean", gr.mean(1) @ gr.mean(1).T)):
        want = brute_force_min_norm(G, 0.45)
        np.testing.assert_allclose(aekd_weights(z, v, 2.5, 0.45, gram).numpy(), want, atol=1e-8)
    sample = aekd_weights(z, v, 2.5, 0.45, "sample").numpy()                  # [M, B]: one QP per sample
    for b in range(7):
        np.testing.assert_allclose(sample[:, b], brute_force_min_norm(gr[:, b] @ gr[:, b].T, 0.45), atol=1e-8)


def test_hint_weights_both_forms_against_the_oracle():
    "Paper (Eq. 16): the min-norm point of the whole flattened gradients' Gram. Code: the min-norm point of "
    "the unit batch-mean gradients, divided by each mean's norm and renormalised. Gradients of very different"
    " scales, M = 3, C = 0.5."
    from kdbook.aekd import brute_force_min_norm, hint_weights
    g = torch.Generator().manual_seed(6)
    scales = torch.tensor([1.0, 4.0, 0.1], dtype=F64).view(3, 1, 1, 1)
    grads = rand(g, 3, 4, 2, 3) * scales + rand(g, 1, 4, 2, 3)
    u = grads.reshape(3, -1).numpy()
    np.testing.assert_allclose(hint_weights(grads, 0.5, "paper").numpy(), brute_force_min_norm(u @ u.T, 0.5),
                               atol=1e-8)
    mean = grads.reshape(3, 4, -1).mean(1).numpy()
    norm = np.linalg.norm(mean, axis=1)
    a = brute_force_min_norm((mean / norm[:, None]) @ (mean / norm[:, None]).T, 0.5) / norm
    np.testing.assert_allclose(hint_weights(grads, 0.5, "code").numpy(), a / a.sum(), atol=1e-8)


def test_aekd_feat_hint_term_is_the_weighted_sum_of_hints():
    "AE-KD*'s β term: Σ_m α'_m H_m with α' the paper's QP on dH_m/dF_s, each gradient taken by its own "
    "autograd call."
    from kdbook.aekd import AEKDFeat, brute_force_min_norm
    from kdbook.baselines import FeatureRegressor
    g = torch.Generator().manual_seed(7)
    fs = rand(g, 5, 4, 2, 2).requires_grad_()
    fts = [rand(g, 5, c, 2, 2, scale=s) for c, s in ((3, 1.0), (2, 3.0), (3, 0.3))]
    torch.manual_seed(1)
    m = AEKDFeat(C=0.5)
    m.regressors = nn.ModuleList(FeatureRegressor(4, f.shape[1], (2, 2)).double() for f in fts).eval()
    term = m.feature_loss(ModelOut([fs], None, None), TeacherOut(None, [[f] for f in fts], None), None)
    H = [F.mse_loss(r(fs), f) for r, f in zip(m.regressors, fts)]
    gr = np.stack([torch.autograd.grad(h, fs, retain_graph=True)[0].flatten().numpy() for h in H])
    w = brute_force_min_norm(gr @ gr.T, 0.5)
    want = sum(wi * float(h.detach()) for wi, h in zip(w, H))
    assert math.isclose(float(term.detach()), want, rel_tol=1e-8)


# ------------------------------------------------------------------------------------------------ chapter 11
def test_moekd_teacher_probabilities_prototypes_and_gate_kl():
    "Eq. 8 at τ = 3 (and hard), Eq. 7 by a loop over classes and samples (K = 4 clusters, d = 3 features, N ="
    " 9), and KL(P^T_τ ‖ softmax(gate)) with the teacher softened and the gate not."
    from kdbook.moekd import class_prototypes, teacher_gate_kl, teacher_probs
    g = torch.Generator().manual_seed(8)
    logits, feats, gate = rand(g, 9, 4, scale=2), rand(g, 9, 3), rand(g, 9, 4)
    P = softmax_np(logits.numpy(), 3.0)
    np.testing.assert_allclose(teacher_probs(logits, 3.0).numpy(), P, rtol=1e-12)
    hard = teacher_probs(logits, 3.0, hard=True).numpy()
    np.testing.assert_array_equal(hard, np.eye(4)[logits.numpy().argmax(1)])
    mu = [sum(P[i, k] * feats.numpy()[i] for i in range(9)) / sum(P[j, k] for j in range(9))
          for k in range(4)]
    np.testing.assert_allclose(class_prototypes(torch.from_numpy(P), feats).numpy(), np.stack(mu), rtol=1e-12)
    want = kl_np(P, softmax_np(gate.numpy(), 1.0))
    np.testing.assert_allclose(teacher_gate_kl(logits, gate, 3.0).numpy(), want, rtol=1e-10)


# ------------------------------------------------------------------------------------------------ chapter 13
def test_free_energy_with_a_temperature():
    from kdbook.mec import free_energy
    g = torch.Generator().manual_seed(9)
    h = rand(g, 6, 5, scale=3)
    want = -2.5 * np.log(np.exp(h.numpy() / 2.5).sum(-1))
    np.testing.assert_allclose(free_energy(h, 2.5).numpy(), want, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ chapter 02
@pytest.mark.parametrize("bias", [False, True])
def test_bn_folding_equals_conv_then_eval_bn(bias):
    "W' = Wγ/√(σ²+ε), b' = (b − μ)γ/√(σ²+ε) + β written out, and the folded convolution equals conv → BN "
    "(eval) on an input; random running statistics, affine parameters and ε = 0.1, so that no term is "
    "neutral."
    from kdbook.models import fold_batchnorm, fold_conv_bn
    g = torch.Generator().manual_seed(10)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=bias).double(), nn.BatchNorm2d(4, eps=0.1).double()
    with torch.no_grad():
        bn.running_mean.copy_(rand(g, 4))
        bn.running_var.copy_(torch.rand(4, generator=g, dtype=F64) * 3 + 0.2)
        bn.weight.copy_(rand(g, 4)); bn.bias.copy_(rand(g, 4))
    fused = fold_conv_bn(conv, bn)
    sd = (bn.running_var + 0.1).sqrt()
    b = conv.bias if bias else torch.zeros(4, dtype=F64)
    with torch.no_grad():
        want_w = conv.weight * (bn.weight / sd).view(4, 1, 1, 1)
        torch.testing.assert_close(fused.weight, want_w, rtol=1e-14, atol=0)
        want_b = (b - bn.running_mean) * bn.weight / sd + bn.bias
        torch.testing.assert_close(fused.bias, want_b, rtol=1e-14, atol=1e-15)
    x = rand(g, 2, 3, 5, 5)
    seq = nn.Sequential(conv, bn).eval()
    with torch.no_grad(): want = seq(x)
    assert fold_batchnorm(seq) == 1
    with torch.no_grad(): torch.testing.assert_close(seq(x), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ chapter 03
def test_learning_rate_schedules_written_out():
    "Cosine: ½·lr·(1 + cos(π·(epoch + step/steps)/epochs)), read within epochs; multistep: lr·γ^(milestones "
    "passed), γ = 0.3."
    from kdbook.learner import TrainConfig, learning_rate
    cos = TrainConfig(epochs=7, lr=0.3, schedule="cosine")
    for e in range(7):
        for s in (0, 3, 9):
            want = 0.15 * (1 + math.cos(math.pi * (e + s / 10) / 7))
            assert math.isclose(learning_rate(cos, e, s, 10), want, rel_tol=1e-12, abs_tol=1e-15), (e, s)
    ms = TrainConfig(epochs=20, lr=0.2, schedule="multistep", milestones=(0.25, 0.5, 0.8), gamma=0.3)
    for e in range(20):
        want = 0.2 * 0.3 ** sum(e >= b for b in (5, 10, 16))
        assert math.isclose(learning_rate(ms, e), want, rel_tol=1e-12), e
    assert learning_rate(TrainConfig(lr=0.07, schedule="constant"), 5, 3, 10) == 0.07
