"""Module tests for kdbook.core: pinned loss values and properties over random inputs."""
import subprocess, sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from kdbook.core import (ce_kd_loss, check_temperature, kd_logit_grad, kd_loss, multi_teacher_kd_loss,
                         soft_cross_entropy, softmax_t, upcast)

B, K, M = 4, 5, 3
ZS = torch.sin(torch.arange(B * K, dtype=torch.float64)).reshape(B, K) * 2
ZT = torch.cos(torch.arange(M * B * K, dtype=torch.float64) * 0.7).reshape(M, B, K) * 3
Y = torch.tensor([0, 3, 1, 4])


def test_public_import_from_a_fresh_interpreter():
    subprocess.run([sys.executable, "-c", "from kdbook.core import kd_loss, multi_teacher_kd_loss, softmax_t"],
                   check=True)


# Numbers computed once (float64) when the losses were written: a refactor that changes a value fails here.
@pytest.mark.parametrize("value,expected", [
    (lambda: kd_loss(ZS, ZT[0], 4.0), 2.6394402563710644),
    (lambda: kd_loss(ZS, ZT[1], 1.0, "sum"), 3.2806009279628086),
    (lambda: multi_teacher_kd_loss(ZS, ZT, T=4.0), 2.2876129300397188),
    (lambda: multi_teacher_kd_loss(ZS, ZT, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), T=2.0),
     1.9891779131070533),
    (lambda: soft_cross_entropy(ZS, softmax_t(ZT[2], 3.0), 3.0), 1.7137395054709665),
    (lambda: ce_kd_loss(ZS, ZT[0], Y, 0.9, 4.0), 2.603662246746836),
], ids=["kd_T4", "kd_T1_sum", "aver_T4", "weighted_T2", "soft_ce_T3", "ce_kd"])
def test_pinned_values(value, expected):
    assert value().item() == pytest.approx(expected, rel=1e-12)


logits = arrays("float64", st.tuples(st.integers(1, 6), st.integers(2, 12)),
                elements=st.floats(-30, 30, allow_nan=False, allow_infinity=False))
temps = st.floats(0.05, 50)


@settings(max_examples=200, deadline=None)
@given(logits, temps, st.floats(-100, 100))
def test_softmax_t_is_a_shift_invariant_distribution(z, T, c):
    z = torch.from_numpy(z)
    p = softmax_t(z, T)
    assert torch.allclose(p.sum(-1), torch.ones(z.shape[0], dtype=z.dtype))
    assert (p >= 0).all()
    assert torch.allclose(softmax_t(z + c, T), p, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(logits, st.data(), temps)
def test_kd_loss_is_nonnegative_and_zero_at_the_teacher(z, data, T):
    zs = torch.from_numpy(z)
    zt = torch.from_numpy(data.draw(arrays("float64", z.shape, elements=st.floats(-30, 30))))
    assert (kd_loss(zs, zt, T, "none") >= -1e-9).all()
    assert kd_loss(zt, zt, T).abs().item() < 1e-9


@settings(max_examples=100, deadline=None)
@given(logits, st.data(), temps)
def test_autograd_matches_the_closed_form_gradient(z, data, T):
    zs = torch.from_numpy(z).requires_grad_()
    zt = torch.from_numpy(data.draw(arrays("float64", z.shape, elements=st.floats(-30, 30))))
    grad, = torch.autograd.grad(soft_cross_entropy(zs, softmax_t(zt, T), T, "sum"), zs)
    assert torch.allclose(grad, kd_logit_grad(zs, zt, T), atol=1e-10)
    # kd_loss carries T²: its per-sample gradient is T² times kd_logit_grad (the unscaled, AE-KD Eq. 14 scale)
    grad_kd, = torch.autograd.grad(kd_loss(zs, zt, T, "sum"), zs)
    assert torch.allclose(grad_kd, T**2 * kd_logit_grad(zs, zt, T), atol=1e-10 * max(1.0, T**2))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_one_hot_weights_pick_one_teacher(m, b, k, seed):
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.randn(b, k, generator=g, dtype=torch.float64), torch.randn(m, b, k, generator=g, dtype=torch.float64)
    j = seed % m
    w = torch.zeros(m, dtype=torch.float64); w[j] = 1
    assert torch.allclose(multi_teacher_kd_loss(zs, zt, w), kd_loss(zs, zt[j]))


def test_check_temperature_returns_a_float():
    assert check_temperature(4) == 4.0 and type(check_temperature(4)) is float
    assert check_temperature(torch.tensor(0.5)) == 0.5


def test_upcast_half_precision_only():
    x = torch.randn(3, 4, dtype=torch.float64)
    for dt in (torch.bfloat16, torch.float16, torch.float32): assert upcast(x.to(dt)).dtype == torch.float32
    assert upcast(x) is x


def test_unchecked_weights_give_the_same_value_and_still_check_the_shape():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert multi_teacher_kd_loss(ZS, ZT, w, check=False).item() == multi_teacher_kd_loss(ZS, ZT, w).item()
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        multi_teacher_kd_loss(ZS, ZT, torch.ones(2), check=False)


@pytest.mark.parametrize("call,message", [
    (lambda: softmax_t(ZS, 0.0), "temperature T must be a finite number > 0, got 0.0"),
    (lambda: check_temperature(True), "temperature T must be a finite number > 0, got True"),
    (lambda: check_temperature(torch.ones(2)), "temperature T must be a finite number > 0, got tensor"),
    (lambda: kd_loss(ZS, ZT[0], float("nan")), "temperature T must be a finite number > 0, got nan"),
    (lambda: kd_loss(ZS, ZT[0], 4.0, "mean"), "reduction must be one of ('batchmean', 'sum', 'none'), got 'mean'"),
    (lambda: kd_loss(ZS, ZT[0, :, :3]), "teacher_logits must have the student's shape (4, 5), got (4, 3)"),
    (lambda: multi_teacher_kd_loss(ZS, ZT, torch.ones(2)), "weights must have shape (3,) (per teacher) or (3, 4)"),
    (lambda: multi_teacher_kd_loss(ZS, ZT, torch.tensor([1.0, float("inf"), 0.0])), "weights must be finite and >= 0"),
    (lambda: ce_kd_loss(ZS, ZT[0], Y, alpha=-0.1), "alpha must be in [0, 1], got -0.1"),
])
def test_bad_input_names_the_value_and_what_is_allowed(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value)
