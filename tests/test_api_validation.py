"""What a notebook user passes to the library is checked: one table per module of bad calls, each refused with a
ValueError or TypeError that names the argument, the value and what is allowed; and beside each table, the good calls
next to them still give the right number (so a check that refused too much fails here too)."""
import math
import pytest
import torch
import torch.nn.functional as F

from kdbook import aekd, core, data, explain
from kdbook.models import create_model


def _refused(call, exc, *parts):
    with pytest.raises(exc) as e: call()
    for p in parts: assert p in str(e.value), (p, str(e.value))


def _probs(*shape):
    return torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(1)), -1)


CORE = [  # (what, call, exception, parts of the message)
    ("logit_matching_loss broadcasts [4, 10] against [4, 1]",
     lambda: core.logit_matching_loss(torch.randn(4, 10), torch.randn(4, 1)), ValueError, ["teacher_logits", "(4, 10)", "(4, 1)"]),
    ("soft_cross_entropy with a negative target probability",
     lambda: core.soft_cross_entropy(torch.randn(4, 10), _probs(4, 10) - torch.eye(4, 10) * 2), ValueError,
     ["target_probs must be probabilities", "min -"]),
    ("soft_cross_entropy with rows that do not sum to 1",
     lambda: core.soft_cross_entropy(torch.randn(4, 10), 2 * _probs(4, 10)), ValueError, ["row sum off 1 by 1"]),
    ("soft_cross_entropy with NaN targets",
     lambda: core.soft_cross_entropy(torch.randn(2, 3), torch.full((2, 3), float("nan"))), ValueError, ["target_probs", "nan"]),
    ("kd_logit_grad over other class counts",
     lambda: core.kd_logit_grad(torch.randn(4, 10), torch.randn(4, 9)), ValueError, ["teacher_logits", "(4, 10)", "(4, 9)"]),
    ("multi_teacher_kd_loss with M = 0 teachers",
     lambda: core.multi_teacher_kd_loss(torch.randn(4, 10), torch.randn(0, 4, 10)), ValueError, ["no teacher", "M must be >= 1"]),
    ("kd_loss with T = 0", lambda: core.kd_loss(torch.randn(2, 3), torch.randn(2, 3), T=0), ValueError, ["T", "got 0"]),
]


@pytest.mark.parametrize("what,call,exc,parts", CORE, ids=[r[0] for r in CORE])
def test_core_refuses(what, call, exc, parts): _refused(call, exc, *parts)


def test_core_good_calls_give_the_reference_numbers():
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    q = torch.softmax(v, -1)
    ref = -(q * torch.log_softmax(z / 2, -1)).sum(-1).mean()         # Eq. 2 by hand, T = 2
    torch.testing.assert_close(core.soft_cross_entropy(z, q, T=2), ref)
    torch.testing.assert_close(core.logit_matching_loss(z, v), ((z - v) ** 2).sum(-1) / 20)
    vm = torch.randn(3, 4, 10, generator=g, dtype=torch.float64)     # M teachers against one student: allowed
    zz = z.clone().requires_grad_()
    ce = -(torch.softmax(vm / 4, -1) * torch.log_softmax(zz / 4, -1)).sum()
    (grad,) = torch.autograd.grad(ce, zz)                           # autograd: the sum over teachers of Eq. 4
    torch.testing.assert_close(core.kd_logit_grad(z, vm, 4.0).sum(0), grad)


DATA_X = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
DATA = [
    ("Split with a negative label", lambda: data.Split(DATA_X, torch.tensor([0, 1, -1, 0, 1, 0])), ValueError,
     ["y must hold class indices >= 0", "-1"]),
    ("ImageDataset with a label past its classes",
     lambda: data.ImageDataset("toy", data.Split(DATA_X, torch.tensor([0, 1, 2, 0, 1, 0])), data.Split(DATA_X, torch.zeros(6).long()),
                               ["a", "b"], (0.5,), (0.25,), 0, False, "test"), ValueError, ["train labels must be in [0, 1]", "2 classes", "got 2"]),
    ("ImageDataset with a test label past its classes",
     lambda: data.ImageDataset("toy", data.Split(DATA_X, torch.zeros(6).long()), data.Split(DATA_X, torch.full((6,), 5)),
                               ["a", "b"], (0.5,), (0.25,), 0, False, "test"), ValueError, ["test labels", "got 5"]),
    ("DeviceLoader with std = inf",
     lambda: data.DeviceLoader(data.Split(DATA_X, torch.zeros(6).long()), 2, train=False, mean=(0.5,), std=(float("inf"),)),
     ValueError, ["std must be > 0 and finite", "inf"]),
    ("DeviceLoader with a NaN mean",
     lambda: data.DeviceLoader(data.Split(DATA_X, torch.zeros(6).long()), 2, train=False, mean=(float("nan"),), std=(0.2,)),
     ValueError, ["mean must be finite", "nan"]),
    ("crop_flip with 3 offsets for 4 images",
     lambda: data.crop_flip(torch.rand(4, 1, 8, 8), torch.zeros(3).long(), torch.zeros(4).long(), torch.zeros(4, dtype=torch.bool), 2),
     ValueError, ["dy must have shape [B] = [4]", "(3,)"]),
    ("crop_flip with one flag too many",
     lambda: data.crop_flip(torch.rand(4, 1, 8, 8), torch.zeros(4).long(), torch.zeros(4).long(), torch.zeros(5, dtype=torch.bool), 2),
     ValueError, ["flip must have shape [B] = [4]", "(5,)"]),
    ("crop_flip with a negative pad",
     lambda: data.crop_flip(torch.rand(4, 1, 8, 8), torch.zeros(4).long(), torch.zeros(4).long(), torch.zeros(4, dtype=torch.bool), -1),
     ValueError, ["pad must be an int >= 0", "-1"]),
    ("exemplar_memory with NaN features",
     lambda: data.exemplar_memory(torch.tensor([[0.0], [float("nan")], [1.0], [2.0]]), torch.tensor([0, 0, 1, 1]), 1),
     ValueError, ["feats must be finite", "1 rows"]),
    ("exemplar_memory with k = 1.5",
     lambda: data.exemplar_memory(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), 1.5), ValueError, ["k must be an int >= 1", "1.5"]),
]


@pytest.mark.parametrize("what,call,exc,parts", DATA, ids=[r[0] for r in DATA])
def test_data_refuses(what, call, exc, parts): _refused(call, exc, *parts)


def test_data_good_calls_give_the_reference_result():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    out = data.crop_flip(x, torch.tensor([1, 0]), torch.tensor([1, 2]), torch.tensor([False, True]), 1)
    padded = F.pad(x, (1, 1, 1, 1))
    torch.testing.assert_close(out[0], padded[0, :, 1:4, 1:4])                  # offset (1, 1): the image itself
    torch.testing.assert_close(out[1], padded[1, :, 0:3, 2:5].flip(-1))         # offset (0, 2), then mirrored
    feats = torch.tensor([[0.0], [10.0], [1.0], [5.0], [6.0], [20.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # class 0: mean 11/3, nearest first 1 (|1-11/3|), 0, 10; class 1: mean 31/3, nearest 6, then 5
    assert data.exemplar_memory(feats, labels, 2).tolist() == [2, 0, 4, 3]
    ds = data.ImageDataset("toy", data.Split(DATA_X, torch.tensor([0, 1, 1, 0, 1, 0])), data.Split(DATA_X, torch.zeros(6).long()),
                           ["a", "b"], (0.5,), (0.25,), 0, False, "test")
    assert ds.n_classes == 2


def _maps(nan=False):
    a = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = a.clone()
    if nan: b[0, 0, 0] = float("nan")
    return a, b


_MLP = create_model("cnn_small", 10, 1)
EXPLAIN = [
    ("spearman with a NaN pixel", lambda: explain.spearman(*_maps(nan=True)), ValueError, ["b must be finite maps"]),
    ("spearman of maps of two shapes", lambda: explain.spearman(torch.rand(2, 6, 6), torch.rand(2, 5, 5)), ValueError,
     ["same shape", "(2, 6, 6)", "(2, 5, 5)"]),
    ("top_iou with top = 1.5", lambda: explain.top_iou(*_maps(), top=1.5), ValueError, ["top must be a fraction", "(0, 1]", "1.5"]),
    ("top_iou with top = 0", lambda: explain.top_iou(*_maps(), top=0), ValueError, ["top must be a fraction", "got 0"]),
    ("top_mask with top = -0.2", lambda: explain.top_mask(torch.rand(2, 4, 4), -0.2), ValueError, ["top", "-0.2"]),
    ("grad_cam with target=None", lambda: explain.grad_cam(_MLP, torch.randn(2, 1, 8, 8), None), ValueError,
     ["target must be a class index", "None"]),
    ("grad_cam with target='cat'", lambda: explain.grad_cam(_MLP, torch.randn(2, 1, 8, 8), "cat"), ValueError,
     ["target must be a class index", "'cat'"]),
    ("grad_cam with target 10 of 10 classes", lambda: explain.grad_cam(_MLP, torch.randn(2, 1, 8, 8), 10), ValueError,
     ["target 10", "[0, 9]"]),
    ("integrated_gradients with n_steps=0", lambda: explain.integrated_gradients(_MLP, torch.randn(2, 1, 8, 8), 1, n_steps=0),
     ValueError, ["n_steps must be an int >= 1", "got 0"]),
]


@pytest.mark.parametrize("what,call,exc,parts", EXPLAIN, ids=[r[0] for r in EXPLAIN])
def test_explain_refuses(what, call, exc, parts): _refused(call, exc, *parts)


def test_explain_good_calls_give_the_reference_numbers():
    from scipy.stats import spearmanr
    a, b = _maps()
    b = b + 0.3 * torch.rand(b.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = explain.spearman(a, b)
    for i in range(2): assert math.isclose(ours[i].item(), spearmanr(a[i].flatten(), b[i].flatten())[0], rel_tol=1e-9)
    top = explain.top_iou(a, b, 1.0)
    assert top.tolist() == [1.0, 1.0]                                            # the whole map: IoU 1, top = 1 allowed


AEKD = [
    ("capped_simplex_projection with C = 0", lambda: aekd.capped_simplex_projection(torch.randn(3), 0), ValueError,
     ["C must be in [1/M, 1]", "M=3", "C=0"]),
    ("capped_simplex_projection with C = 1.5", lambda: aekd.capped_simplex_projection(torch.randn(3), 1.5), ValueError,
     ["C must be in [1/M, 1]", "C=1.5"]),
    ("capped_simplex_projection of M = 0 coordinates", lambda: aekd.capped_simplex_projection(torch.randn(0), 0.5), ValueError,
     ["M >= 1", "(0,)"]),
    ("aekd_weights over other class counts", lambda: aekd.aekd_weights(torch.randn(4, 10), torch.randn(3, 4, 9)), ValueError,
     ["t_logits must have shape [M, 4, 10]", "(3, 4, 9)"]),
    ("aekd_weights with M = 0 teachers", lambda: aekd.aekd_weights(torch.randn(4, 10), torch.randn(0, 4, 10)), ValueError,
     ["M >= 1", "(0, 4, 10)"]),
    ("capped_simplex_min_norm with M = 0", lambda: aekd.capped_simplex_min_norm(torch.zeros(0, 0), 0.5), ValueError, ["M"]),
]


@pytest.mark.parametrize("what,call,exc,parts", AEKD, ids=[r[0] for r in AEKD])
def test_aekd_refuses(what, call, exc, parts): _refused(call, exc, *parts)


def test_aekd_good_calls_give_the_reference_numbers():
    from scipy.optimize import minimize
    v = torch.tensor([0.9, 0.5, -0.2, 0.1], dtype=torch.float64)
    for C in (0.25, 0.4, 1.0):                                      # C = 1/M is allowed: the uniform point
        ours = aekd.capped_simplex_projection(v, C)
        r = minimize(lambda a: ((a - v.numpy()) ** 2).sum(), x0=[0.25] * 4, bounds=[(0, C)] * 4, method="SLSQP",
                     constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}], options={"ftol": 1e-14})
        torch.testing.assert_close(ours, torch.tensor(r.x), atol=1e-6, rtol=0)
