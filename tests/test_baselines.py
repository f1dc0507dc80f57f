"Module tests of kdbook.baselines: pinned loss values, weight distributions, reduction to AVER, registry names, regressors, bad hyper-parameters."
import json
from pathlib import Path

import pytest, torch
from torch import nn
from kdbook.core import multi_teacher_kd_loss
from kdbook.learner import METHODS, register_method
from kdbook.baselines import (AVER, CAMKD, EBKD, FeatureRegressor, FitNetMKD, MultiTeacherKD, build_regressors,
                              confidence_weights, entropy_weights, label_cross_entropy, pinned_batch)
from kdbook.models import ModelOut, TeacherBank, TeacherOut, create_model

# One fixture, shared with nbs/04_baselines.ipynb: a refactor that changes a method's number fails.
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "pinned_baselines.json").read_text())
PINNED, PINNED_FEAT = FIXTURE["logit"], FIXTURE["feature"]

@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_logit_losses(name):
    z, v, y = pinned_batch()
    out = METHODS[name](beta=0.0).loss((None, y, None), ModelOut([], None, z), TeacherOut(v, None, None))
    for k, val in PINNED[name].items(): assert out[k].item() == pytest.approx(val, rel=1e-9), k

def feature_case():
    "Fixed float64 feature maps and deterministic regressors and heads: no network initialisation involved."
    g = torch.Generator().manual_seed(99)
    z, v, y = pinned_batch()
    M, B = v.shape[:2]
    fs = torch.randn(B, 4, 2, 2, generator=g, dtype=torch.float64)
    fts = [torch.randn(B, c, 2, 2, generator=g, dtype=torch.float64) for c in (3, 5, 3)]
    regs = nn.ModuleList(FeatureRegressor(4, c, (2, 2)).double() for c in (3, 5, 3))
    heads = []
    with torch.no_grad():
        for r in regs:
            for p in r.parameters(): p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            lin = nn.Linear(r.proj[0].out_channels, 10).double()
            for p in lin.parameters(): p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
            heads.append(lambda f, lin=lin: lin(f.mean((2, 3))))
    s = ModelOut([fs], fs.mean((2, 3)), z)
    t = TeacherOut(v, [[f] for f in fts], [f.mean((2, 3)) for f in fts])
    return s, t, y, regs, heads

def feature_losses(cls, beta):
    s, t, y, regs, heads = feature_case()
    m = cls(beta=beta)
    m.regressors, m.heads = regs, heads
    m.train()
    return {k: v.item() for k, v in m.loss((None, y, None), s, t).items()}

def test_pinned_feature_losses():
    fit, ca = feature_losses(FitNetMKD, 100.0), feature_losses(CAMKD, 50.0)
    assert fit["feat"] == pytest.approx(PINNED_FEAT["fitnet"]["feat"], rel=1e-9)
    assert fit["loss"] == pytest.approx(PINNED_FEAT["fitnet"]["loss"], rel=1e-9)
    assert ca["feat"] == pytest.approx(PINNED_FEAT["camkd"]["feat"], rel=1e-9)
    assert ca["loss"] == pytest.approx(PINNED_FEAT["camkd"]["loss"], rel=1e-9)
    # the KD parts are the logit methods' pinned numbers: the feature term is added, nothing else changes
    assert fit["kd"] == pytest.approx(PINNED["aver"]["kd"], rel=1e-9)
    assert ca["kd"] == pytest.approx(PINNED["camkd"]["kd"], rel=1e-9)

@pytest.mark.parametrize("name", sorted(PINNED))
def test_kd_term_is_core_multi_teacher_kd_loss(name):
    z, v, y = pinned_batch()
    m = METHODS[name](beta=0.0)
    out = m.loss((None, y, None), ModelOut([], None, z), TeacherOut(v, None, None))
    assert out["kd"].item() == pytest.approx(multi_teacher_kd_loss(z, v, m.teacher_weights(z, v, y), m.T).item(), rel=1e-12)

def test_registry_names():
    ours = (AVER, EBKD, CAMKD, FitNetMKD)
    assert [c.name for c in ours] == ["aver", "ebkd", "camkd", "fitnet"]
    assert all(METHODS[c.name] is c for c in ours)
    assert all(cls.name == name for name, cls in METHODS.items())
    assert MultiTeacherKD.name == "multi_teacher_kd" and MultiTeacherKD.name not in METHODS
    with pytest.raises(ValueError, match="'aver' is taken by"):
        register_method(type("AnotherAVER", (MultiTeacherKD,), {"name": "aver"}))
    assert METHODS["aver"] is AVER

@pytest.mark.parametrize("arch", ["mlp_tiny", "cnn_small"])
@pytest.mark.parametrize("layer", [0, -1])
def test_build_regressors_map_to_each_teachers_shape(arch, layer):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    bank = TeacherBank([create_model("cnn_small", 10, 1), create_model("mlp", 10, 1)])
    student = create_model(arch, 10, 1)
    regs = build_regressors(student, bank, (x, None, None), layer)
    assert len(regs) == 2 and all(isinstance(r, FeatureRegressor) for r in regs)
    fs = student(x).feats[layer]
    for r, ft in zip(regs, bank(x, feats=True).feats): assert r(fs).shape == ft[layer].shape

@pytest.mark.parametrize("M", [1, 2, 5])
def test_weights_are_distributions(M):
    g = torch.Generator().manual_seed(M)
    v = 3 * torch.randn(M, 20, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (20,), generator=g)
    for w in (entropy_weights(v), confidence_weights(label_cross_entropy(v, y))):
        assert w.shape == (M, 20) and (w >= 0).all()
        torch.testing.assert_close(w.sum(0), torch.ones(20, dtype=torch.float64))

def test_reduce_to_aver_with_identical_teachers():
    torch.manual_seed(0)
    net = create_model("cnn_small", 10, 1).eval()
    bank = TeacherBank([net, net, net])
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    student = create_model("mlp", 10, 1)
    s, t = student(x), bank(x, feats=True)
    ref = AVER().loss((x, y, None), s, t)["loss"]
    for cls in (EBKD, CAMKD, FitNetMKD):
        m = cls(beta=0.0); m.setup(student, bank, (x, y, None))
        torch.testing.assert_close(m.loss((x, y, None), s, t)["loss"], ref)

@pytest.mark.parametrize("kwargs, msg", [
    ({"T": 0}, "temperature T must be a finite number > 0, got 0"),
    ({"T": float("nan")}, "temperature T must be a finite number > 0, got nan"),
    ({"gamma": -1}, "gamma must be a finite number >= 0, got -1"),
    ({"alpha": "1"}, "alpha must be a finite number >= 0, got '1'"),
    ({"beta": float("inf")}, "beta must be a finite number >= 0, got inf")])
def test_bad_hyper_parameters(kwargs, msg):
    for cls in (AVER, EBKD, CAMKD, FitNetMKD):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")): cls(**kwargs)

# RepDistiller's FitNet regressor, offered as an option of the feature methods
from kdbook.baselines import REGRESSORS, RepDistillerRegressor

def test_repdistiller_regressor_counts_for_resnet32x4_to_shufflev1_at_layer_2():
    "Closed forms: 4x4 transposed conv 480->128 (+bias) vs 1x1 conv (+bias), each with BN's 2x128."
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    bank, student = TeacherBank([create_model("resnet32x4", 100)]), create_model("ShuffleV1", 100)
    counts = {}
    for kind in REGRESSORS:
        (reg,) = build_regressors(student, bank, (x, None, None), 2, kind)
        counts[kind] = sum(p.numel() for p in reg.parameters())
        assert reg(student(x).feats[2]).shape == (2, 128, 16, 16)
    assert counts == {"repdistiller": 480 * 128 * 16 + 128 + 2 * 128, "kdbook": 480 * 128 + 128 + 2 * 128}
    assert counts == {"repdistiller": 983_424, "kdbook": 61_824}

@pytest.mark.parametrize("size_in, size_out, conv, kernel, stride", [
    ((8, 8), (4, 4), nn.Conv2d, (3, 3), (2, 2)), ((4, 4), (8, 8), nn.ConvTranspose2d, (4, 4), (2, 2)),
    ((7, 6), (4, 4), nn.Conv2d, (4, 3), (1, 1)), ((4, 4), (4, 4), nn.Conv2d, (1, 1), (1, 1)),
    ((2, 2), (1, 1), nn.Conv2d, (3, 3), (2, 2))])
def test_repdistiller_regressor_rule(size_in, size_out, conv, kernel, stride):
    r = RepDistillerRegressor(6, 5, size_in, size_out)
    first, bn, relu = r.proj
    assert type(first) is conv and first.kernel_size == kernel and first.stride == stride
    assert first.bias is not None
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    out = r(torch.randn(3, 6, *size_in))
    assert out.shape == (3, 5, *size_out) and (out >= 0).all()

def test_repdistiller_regressor_refuses_a_smaller_student_map():
    with pytest.raises(ValueError, match=r"size_in \(2, 2\) and size_out \(8, 8\): RepDistiller's"):
        RepDistillerRegressor(3, 5, (2, 2), (8, 8))

@pytest.mark.parametrize("cls", [FitNetMKD, CAMKD])
def test_feature_methods_take_the_regressor_option(cls):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    bank = TeacherBank([create_model("cnn_small", 10, 1), create_model("mlp", 10, 1)])   # last maps 2x2, 1x1
    student = create_model("cnn_small", 10, 1)
    m = cls(regressor="repdistiller")
    assert m.hparams()["regressor"] == "repdistiller" and cls().hparams()["regressor"] == "kdbook"
    m.setup(student, bank, (x, y, None))
    assert all(isinstance(r, RepDistillerRegressor) for r in m.regressors)
    assert [type(r.proj[0]) for r in m.regressors] == [nn.Conv2d, nn.Conv2d]
    assert [r.proj[0].stride for r in m.regressors] == [(1, 1), (2, 2)]   # same size; twice the teacher's
    out = m.loss((x, y, None), student(x), bank(x, feats=True))
    out["loss"].backward()
    assert out["feat"] > 0 and all(p.grad is not None for p in m.regressors.parameters())
    with pytest.raises(ValueError, match="regressor must be one of 'kdbook', 'repdistiller', got 'other'"):
        cls(regressor="other")
