"""kdbook.explain: Grad-CAM against autograd, Integrated Gradients' completeness, the agreement scores against
scipy, the refusals, and the shared figures."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from scipy.stats import spearmanr

from kdbook.explain import (KeepStudents, agreement_table, agreement_widget, attribution_map, average_ranks, curves_figure,
                            explain_maps, grad_cam, grad_cam_loop, gradcam_speed, integrated_gradients, map_agreement,
                            map_grid, method_bars, spearman, study_curves, top_iou, top_mask,
                            top_set_short)
from kdbook.models import create_model, randomize_bn


def grad_cam_autograd(model, x, t, stage=-1):
    "Grad-CAM written out: ReLU of the channel sum of (spatially averaged gradient × activation), upsampled bilinearly."
    model.eval()
    out = model(x)
    A = out.feats[stage]
    (grad,) = torch.autograd.grad(out.logits.gather(1, t[:, None]).sum(), A)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * A).sum(1, keepdim=True))
    return F.interpolate(cam, x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()


@pytest.mark.parametrize("arch", ["cnn_small", "resnet8", "vgg8", "wrn_16_1", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_grad_cam_equals_autograd_on_random_models(arch):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = randomize_bn(create_model(arch, 7, 3)).train()
    x, t = torch.randn(5, 3, 32, 32, generator=g), torch.randint(0, 7, (5,), generator=g)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cam = grad_cam(model, x, t)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert cam.shape == (5, 32, 32) and (cam >= 0).all()
    ref = grad_cam_autograd(model, x, t)
    torch.testing.assert_close(cam, ref, atol=1e-6 * max(1.0, float(ref.abs().max())), rtol=1e-5)


def test_batched_equals_loop_and_earlier_stage():
    torch.manual_seed(0)
    model = randomize_bn(create_model("resnet8", 10, 1))
    x, t = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    torch.testing.assert_close(grad_cam(model, x, t), grad_cam_loop(model, x, t), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grad_cam(model, x, t, layer=2), grad_cam_autograd(model, x, t, stage=2), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grad_cam(model, x, t, layer="stages.2"), grad_cam(model, x, t, layer=model.stages[2]))


def test_last_stage_grad_cam_is_cam():
    torch.manual_seed(0)
    model = randomize_bn(create_model("cnn_small", 10, 1)).eval()
    x, t = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with torch.no_grad(): A = model(x).feats[-1]
    cam = F.relu(torch.einsum("bk,bkhw->bhw", model.classifier.weight[t], A))[:, None] / (A.shape[2] * A.shape[3])
    torch.testing.assert_close(grad_cam(model, x, t), F.interpolate(cam, (28, 28), mode="bilinear")[:, 0], atol=1e-7, rtol=1e-5)


def test_trained_model_peaks_on_the_label_region():
    from kdbook.data import ImageDataset, Split
    from kdbook.learner import Distiller, Method, TrainConfig
    g = torch.Generator().manual_seed(0)
    def split(n):
        y = torch.randint(0, 2, (n,), generator=g)
        x = 128 + 40 * torch.randn(n, 1, 16, 16, generator=g)
        x[:, :, 8:, 8:] += 30 * (2 * y - 1).float()[:, None, None, None]    # the bottom-right quadrant carries the label
        return Split(x.clamp(0, 255).round().to(torch.uint8), y)
    task = ImageDataset("region", split(600), split(100), ["dark", "bright"], (0.5,), (0.16,), 0, False, "synthetic")
    torch.manual_seed(0)
    net = create_model("cnn_small", 2, 1)
    Distiller(net, Method(), task, cfg=TrainConfig(epochs=2, batch_size=64), progress=False).fit()
    cam = grad_cam(net, (task.test.x.float() / 255 - 0.5) / 0.16, task.test.y)
    peak = cam.flatten(1).argmax(1)
    assert ((peak // 16 >= 8) & (peak % 16 >= 8)).float().mean() >= 0.9


@pytest.mark.parametrize("call, message", [
    (lambda: grad_cam(create_model("mlp", 10, 1), torch.randn(2, 1, 8, 8), 0), "MLP has no feature maps to attribute"),
    (lambda: grad_cam(create_model("mlp_tiny", 10, 1), torch.randn(2, 1, 8, 8), 0), "use integrated_gradients"),
    (lambda: grad_cam(create_model("cnn_small", 10, 1), torch.randn(2, 1, 8, 8), 12), "target 12 is outside the classes: the model has 10, so targets must be in [0, 9]"),
    (lambda: grad_cam(create_model("cnn_small", 3, 1), torch.randn(2, 1, 8, 8), torch.tensor([0, 3])), "target 3 is outside the classes"),
    (lambda: grad_cam(create_model("cnn_small", 10, 1), torch.randn(2, 1, 8, 8), 0, layer="head"), "layer 'head' is not in SmallCNN; allowed: None (the last stage), a stage index in [-3, 3)"),
    (lambda: grad_cam(create_model("cnn_small", 10, 1), torch.randn(2, 1, 8, 8), 0, layer=-4), "layer -4 is not in SmallCNN"),
    (lambda: grad_cam(create_model("cnn_small", 10, 1), torch.randn(2, 1, 8, 8), 0, layer=nn.ReLU()), "layer ReLU is not a submodule of SmallCNN"),
    (lambda: map_agreement(torch.rand(2, 4, 4), torch.rand(2, 4, 4), top=1.5), "top must be a fraction of the pixels in (0, 1], got 1.5"),
])
def test_bad_input_is_refused_with_what_is_allowed(call, message):
    with pytest.raises(ValueError) as e: call()
    assert message in str(e.value)


def test_integrated_gradients_completeness():
    torch.manual_seed(0)
    model = create_model("mlp", 10, 1).double()
    x = 2 * torch.randn(8, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad(): gap = model(x).logits[:, 2] - model(torch.zeros_like(x)).logits[:, 2]
    attr, delta = integrated_gradients(model, x, 2, n_steps=256)
    torch.testing.assert_close(attr.sum((1, 2, 3)) - gap, delta, atol=1e-10, rtol=0)
    assert float(delta.abs().max()) < 0.01 * float(gap.abs().max())
    m = attribution_map(model.float(), x.float(), 2)
    assert m.shape == (8, 8, 8) and (m >= 0).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 40), st.sampled_from([None, 0.3, 0.7]))
def test_spearman_matches_scipy_with_ties(seed, n, cut):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(3, n, generator=g), torch.rand(3, n, generator=g)
    if cut is not None: a, b = F.relu(a - cut), (b * 4).round()
    ours = spearman(a, b)
    for i in range(3):
        ref = spearmanr(a[i].numpy(), b[i].numpy()).statistic
        if np.isnan(ref): assert torch.isnan(ours[i])
        else: assert abs(float(ours[i]) - ref) < 1e-10


def test_average_ranks_and_iou():
    assert average_ranks(torch.tensor([[2.0, 2, 2]])).tolist() == [[2.0, 2.0, 2.0]]
    a = torch.rand(5, 6, 6)
    assert (top_iou(a, a, 0.25) == 1).all() and (top_iou(a, -a, 0.5) == 0).all()
    rows = agreement_table(a, {"same": a, "flipped": -a})
    assert rows[0]["spearman_mean"] == pytest.approx(1.0) and rows[1]["spearman_mean"] == pytest.approx(-1.0)
    assert rows[0]["spearman_n"] == 5


def _top_set_by_hand(values: list, top: float) -> set:
    "The pixels strictly above the (k+1)-th largest value, k = round(top * n) (at least 1); all pixels when k = n."
    n = len(values)
    k = max(1, round(top * n))
    if k == n: return set(range(n))
    first_out = sorted(values, reverse=True)[k]
    return {i for i, v in enumerate(values) if v > first_out}


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.05, 0.1, 0.2, 0.5, 1.0]), st.integers(0, 12))
def test_top_sets_and_iou_against_brute_force(seed, top, n_pos):
    "Maps with `n_pos` positive pixels (ReLU zeros elsewhere, a few of them tied), against sets built by hand."
    g = torch.Generator().manual_seed(seed)
    maps = torch.zeros(2, 36, dtype=torch.float64)
    for j in range(2):
        where = torch.randperm(36, generator=g)[:n_pos]
        maps[j, where] = torch.randint(1, 4, (n_pos,), generator=g).double()   # ties among the positive pixels too
    a, b = maps.view(2, 1, 6, 6)[0], maps.view(2, 1, 6, 6)[1]
    sa, sb = _top_set_by_hand(maps[0].tolist(), top), _top_set_by_hand(maps[1].tolist(), top)
    assert set(top_mask(a, top).flatten().nonzero()[:, 0].tolist()) == sa
    iou = float(top_iou(a, b, top)[0])
    if sa and sb: assert iou == pytest.approx(len(sa & sb) / len(sa | sb), abs=1e-6)   # float32 division
    else: assert np.isnan(iou)
    k = max(1, round(top * 36))
    assert bool(top_set_short(a, top)[0]) == (len(sa) < k)


def test_top_iou_ignores_shared_zeros():
    "Two maps with 2 positive pixels each, nowhere in common: their top-10% sets share nothing (by index: 3 zeros)."
    a, b = torch.zeros(1, 7, 7), torch.zeros(1, 7, 7)
    a[0, 6, :2], b[0, 5, :2] = 1.0, 2.0
    assert float(top_iou(a, b, 0.1)[0]) == 0.0 and int(top_mask(a, 0.1).sum()) == 2
    rows = agreement_table(torch.cat([a, a]), {"t": torch.cat([b, torch.ones(1, 7, 7)])})
    assert rows[0]["iou_n"] == 1 and rows[0]["iou_mean"] == 0.0    # the constant map's NaN is left out


def test_explain_maps_and_keep_students():
    from kdbook.data import load_dataset
    from kdbook.learner import Method, TrainConfig
    from kdbook.study import run_study
    digits = load_dataset("digits").subset(n_train=200, n_test=40)
    keep = KeepStudents(lambda: create_model("cnn_small", 10, 1))
    study = run_study(digits, None, keep, {"alone": Method}, seeds=[0, 1], cfg=TrainConfig(epochs=1, batch_size=50), baseline=False)
    nets = keep.by_run(study)
    assert sorted(nets) == ["alone/0", "alone/1"] and nets["alone/0"] is not nets["alone/1"]
    x = (digits.test.x.float() / 255 - digits.mean[0]) / digits.std[0]
    maps = explain_maps(nets, x, digits.test.y, batch_size=16)
    assert maps["alone/0"].shape == (40, 8, 8)
    torch.testing.assert_close(maps["alone/1"], grad_cam(nets["alone/1"], x, digits.test.y))
    with pytest.raises(ValueError, match="made 2 students but the study has 1 runs of its own"):
        keep.by_run(run_study(digits, None, lambda: create_model("cnn_small", 10, 1), {"alone": Method}, seeds=[0],
                              cfg=TrainConfig(epochs=1, batch_size=50), baseline=False))


def test_keep_students_leaves_out_the_runs_a_folder_keeps(tmp_path):
    "A study's folder keeps other methods' runs (`kept`) and reuses finished ones: neither has a net trained."
    from kdbook.data import load_dataset
    from kdbook.learner import Method, TrainConfig
    from kdbook.study import run_study
    digits = load_dataset("digits").subset(n_train=200, n_test=40)
    cfg, make = TrainConfig(epochs=1, batch_size=50), lambda: create_model("cnn_small", 10, 1)
    run_study(digits, None, make, {"other": Method}, seeds=[0], cfg=cfg, baseline=False, out=tmp_path)
    keep = KeepStudents(make)
    study = run_study(digits, None, keep, {"alone": Method}, seeds=[0, 1], cfg=cfg, baseline=False, out=tmp_path)
    assert sorted(study.runs) == ["alone/0", "alone/1", "other/0"] and study.runs["other/0"]["kept"]
    nets = keep.by_run(study)
    assert sorted(nets) == ["alone/0", "alone/1"] and len(keep.nets) == 2
    again = KeepStudents(make)
    assert again.by_run(run_study(digits, None, again, {"alone": Method}, seeds=[0, 1], cfg=cfg, baseline=False,
                                  out=tmp_path)) == {}   # both reused: nothing trained


def test_figures():
    rows = [{"method": "ce", "n": 2, "mean": 90.0, "std": 1.0}, {"method": "aekd", "n": 2, "mean": 91.0, "std": 0.5},
            {"method": "bad", "n": 0, "mean": None, "std": None}]
    fig = method_bars(rows, paper={"aekd": 93.0, "ce": 89.0})
    assert list(fig.data[0].x) == ["student", "aekd"] and list(fig.data[1].y) == [93.0, 89.0]
    assert fig.layout.yaxis.range[0] < 89 and fig.layout.yaxis.range[1] > 93
    assert fig.layout.yaxis.title.text == f"top-1 (%); the axis starts at {fig.layout.yaxis.range[0]:.3g}, not 0"
    result = {"runs": {f"ce/{s}": {"method": "ce", "status": "ok", "history": [{"test_top1": 50 + s}, {"test_top1": 60 + s}]}
                       for s in range(3)}}
    curves = curves_figure(study_curves(result), widget=True)
    assert type(curves).__name__ == "FigureWidget" and list(curves.data[-1].y) == [51.0, 61.0]
    grid = map_grid(torch.rand(2, 3, 8, 8), {"a": torch.rand(2, 8, 8)})
    assert len(grid.data) == 2 * 3 and grid.data[1].z.dtype == np.uint8
    assert len(grid.to_json()) < 50_000
    w = agreement_widget(torch.rand(3, 8, 8), {"s": torch.rand(3, 8, 8)}, {"t": torch.rand(3, 8, 8)})
    w.children[0].children[0].value = 2
    assert "Spearman" in w.children[1].layout.title.text


def test_gradcam_speed_reports_a_ratio():
    r = gradcam_speed(n=20, reps=1, shape=(1, 16, 16))
    assert r["ratio"] > 0 and r["max_abs_diff"] < 1e-6
