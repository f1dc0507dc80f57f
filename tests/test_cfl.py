"Chapter 12, CFL: MMD against loops and its properties, the amalgamation setting's errors, KA and CFL trained, `kdbook run --experts`."
import math

import pytest
import torch
import torch.nn.functional as F

from kdbook.data import load_dataset
from kdbook.learner import Distiller, TrainConfig, make_method
from kdbook.models import TeacherBank, create_model
from kdbook.cfl import SIGMAS, Amalgamation, CFL, KA, check_expert_outputs, mmd, public_mmd, union_logits
from conftest import quick_run


@pytest.mark.parametrize("seed", range(4))
def test_mmd_matches_a_loop_and_the_public_code(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(9, 4, generator=g, dtype=torch.float64), 2 * torch.randn(9, 4, generator=g, dtype=torch.float64) + 0.3
    k = lambda a, b: sum(math.exp(-float((a - b).pow(2).sum()) / (2 * s * s)) for s in SIGMAS)
    loop = (sum(k(a, b) for a in x for b in x) + sum(k(a, b) for a in y for b in y) - 2 * sum(k(a, b) for a in x for b in y)) / 81
    torch.testing.assert_close(mmd(x, y), torch.tensor(loop, dtype=torch.float64))
    torch.testing.assert_close(mmd(x, y), public_mmd(x, y), rtol=1e-6, atol=1e-7)
    unb = (sum(k(a, b) for i, a in enumerate(x) for j, b in enumerate(x) if i != j) / 72
           + sum(k(a, b) for i, a in enumerate(y) for j, b in enumerate(y) if i != j) / 72 - 2 * sum(k(a, b) for a in x for b in y) / 81)
    torch.testing.assert_close(mmd(x, y, unbiased=True), torch.tensor(unb, dtype=torch.float64))


def test_biased_mmd_is_nonnegative_and_zero_on_identical_samples():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = torch.randn(12, 3, generator=g), torch.randn(7, 3, generator=g) * 3
        assert mmd(x, y) >= -1e-6
    x = torch.randn(10, 5, generator=g)
    assert abs(float(mmd(x, x))) < 1e-5
    batched = mmd(x.expand(3, 10, 5), torch.stack([x, x + 1, x * 2]))
    torch.testing.assert_close(batched, torch.stack([mmd(x, x), mmd(x, x + 1), mmd(x, x * 2)]))


def test_the_setting_refuses_bad_groups():
    digits = load_dataset("digits")
    with pytest.raises(ValueError, match="class 3 belongs to expert 0 and to expert 1"): Amalgamation(digits, [[0, 1, 2, 3], [3, 4, 5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match=r"classes \[9\] belong to no expert"): Amalgamation(digits, [[0, 1, 2, 3], [4, 5, 6, 7, 8]])
    with pytest.raises(ValueError, match="expert 1 has 1 class"): Amalgamation(digits, [list(range(9)), [9]])
    with pytest.raises(ValueError, match="got 11"): Amalgamation.split(digits, 11)
    am = Amalgamation.split(digits, 2, seed=3)
    with pytest.raises(ValueError, match="teacher 0 has 4 outputs but its class group has 5 classes"): check_expert_outputs([4, 5], am.tasks)
    u = union_logits([torch.zeros(1, 5), torch.ones(1, 5)], am.tasks)
    assert u[0, am.tasks[1]].eq(1).all() and u[0, am.tasks[0]].eq(0).all()


@pytest.mark.parametrize("name,settings", [("ka", {}), ("ka", {"gamma": 1.0}), ("ka", {"only": 1}), ("cfl", {"hidden": 8}),
                                           ("cfl", {"hidden": 8, "space": "direct"}), ("cfl", {"hidden": 8, "space": "random"})])
def test_amalgamating_methods_train_and_report_per_task_accuracy(name, settings):
    ds = load_dataset("digits")
    am = Amalgamation.split(ds, 2, seed=0)
    torch.manual_seed(0)
    experts = [create_model(a, len(t), 1) for a, t in zip(("cnn_small", "resnet8"), am.tasks)]
    d = Distiller(create_model("cnn_tiny", 10, 1), make_method(name, **settings), ds, teachers=experts,
                  cfg=TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=1e-3), progress=False, tasks=am.tasks)
    h = d.fit()[-1]
    assert math.isfinite(h["train_loss"]) and len(h["test_tasks"]) == 2 and all(0 <= a <= 100 for a in h["test_tasks"])


def test_cli_amalgamates_experts(tmp_path, cli_data):
    res = quick_run(tmp_path, cli_data, "--experts", "2", methods="ka,cfl")
    for m in ("ka", "cfl"):
        run = res["runs"][f"{m}/0"]
        assert run["status"] in ("ok", "diverged") and len(run["tasks"]) == 2   # one epoch: finished, maybe at chance and all(0 <= a <= 100 for a in run["tasks"]), run
    assert sorted(sum((t["classes"] for t in res["teachers"]), [])) == list(range(10))


# ------------------------------------------------------------------------------------------------ values written out
def _closed_form(mu2: float, s: float, sigma: float, d: int) -> float:
    "MMD² between N(0, s²I_d) and N(μ, s²I_d) for one RBF kernel of bandwidth σ (chapter 12)."
    r = (sigma ** 2 / (sigma ** 2 + 2 * s ** 2)) ** (d / 2)
    return 2 * r * (1 - math.exp(-mu2 / (2 * (sigma ** 2 + 2 * s ** 2))))


def test_both_estimators_have_the_closed_form_expectation():
    "300,000 problems of n = 3 and m = 5 Gaussian samples, two bandwidths: the unbiased estimate's mean is "
    "the closed form, the biased one's adds the diagonals Σ_σ (1 − r_σ)(1/n + 1/m); both within 3 standard "
    "errors, which are below 0.17% of the value, so a 1% error in either estimator fails."
    g = torch.Generator().manual_seed(0)
    n, m, s, sigmas, mu = 3, 5, 0.7, (0.5, 2.0), torch.tensor([1.5, 0.0], dtype=torch.float64)
    x = s * torch.randn(300_000, n, 2, generator=g, dtype=torch.float64)
    y = s * torch.randn(300_000, m, 2, generator=g, dtype=torch.float64) + mu
    want = {True: sum(_closed_form(2.25, s, sg, 2) for sg in sigmas)}
    want[False] = want[True] + sum(1 - sg ** 2 / (sg ** 2 + 2 * s ** 2) for sg in sigmas) * (1 / n + 1 / m)
    for unbiased, v in want.items():
        est = mmd(x, y, sigmas, unbiased=unbiased)
        se = float(est.std()) / math.sqrt(len(est))
        assert 3 * se < 0.005 * v and abs(float(est.mean()) - v) < 3 * se, (unbiased, float(est.mean()), v)


def _mmd_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    "The biased MMD² over the public code's bandwidths from pairwise differences (no matrix-product "
    "distances)."
    k = lambda p, q: sum(torch.exp(-(p[:, None] - q[None]).pow(2).sum(-1) / (2 * sg * sg)) for sg in SIGMAS)
    return float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())


@pytest.mark.parametrize("space", ["common", "direct"])
def test_cfl_feature_loss_and_loss_match_their_formulas(space, float64):
    "In float64, two experts of different widths and map sizes (cnn_small, vgg8) and a cnn_tiny student: the "
    "feature term is Σ_m MMD²(unit rows of the student's common map, of expert m's) + Σ_m MSE(reconstruction,"
    " expert map) (or, 'direct', Σ_m MSE(1×1 conv of the student's map, expert map)), and the loss T²·CE(soft"
    " target) + γ·CE + λ·feature."
    torch.manual_seed(0)
    tasks = [torch.tensor([0, 2, 5, 7]), torch.tensor([1, 3, 4, 6, 8, 9])]
    student = create_model("cnn_tiny", 10, 1)
    bank = TeacherBank([create_model(a, len(t), 1) for a, t in zip(("cnn_small", "vgg8"), tasks)])
    x, y = torch.randn(12, 1, 16, 16), torch.randint(0, 10, (12,))
    method = CFL(T=2.0, gamma=0.5, lam=3.0, hidden=8, space=space)
    method.setup(student, bank, (x, y, None))
    method._tasks = tasks
    with torch.no_grad(): s, t = student(x), bank(x, feats=True)
    size = s.feats[-1].shape[-2:]
    fts = [f[-1] if f[-1].shape[-2:] == size else F.adaptive_avg_pool2d(f[-1], size) for f in t.feats]
    assert any(f[-1].shape[-2:] != size for f in t.feats)          # the pooling is exercised
    with torch.no_grad():
        if space == "direct":
            feat = sum(float((c(s.feats[-1]) - f).pow(2).mean()) for c, f in zip(method.imitate, fts))
        else:
            hs, hts, recs = method.common(s.feats[-1], fts)
            unit = lambda h: h.flatten(1) / h.flatten(1).norm(dim=1, keepdim=True)
            feat = (sum(_mmd_by_hand(unit(hs), unit(h)) for h in hts)
                    + sum(float((r - f).pow(2).mean()) for r, f in zip(recs, fts)))
        assert math.isclose(float(method.feature_loss(s, t)), feat, rel_tol=1e-10)
        out = method.loss((x, y), s, t)
    union = torch.empty(12, 10)
    for v, tk in zip(t.logits, tasks): union[:, tk] = v
    q = torch.exp(union / 2.0) / torch.exp(union / 2.0).sum(1, keepdim=True)
    p2 = torch.exp(s.logits / 2.0) / torch.exp(s.logits / 2.0).sum(1, keepdim=True)
    p1 = torch.exp(s.logits) / torch.exp(s.logits).sum(1, keepdim=True)
    soft = float(-(q * torch.log(p2)).sum(1).mean()) * 4.0
    ce = float(-torch.log(p1)[torch.arange(12), y].mean())
    assert math.isclose(float(out["loss"]), soft + 0.5 * ce + 3.0 * feat, rel_tol=1e-10)


def test_common_space_is_its_convolutions_composed_by_hand(float64):
    "The common space's forward against F.conv2d written out with its own weights (C1): aligner 1×1 conv + ReLU,"
    " three residual blocks (a 1×1 shortcut only where the width changes), a 3×3–ReLU–1×1 decoder per expert."
    from kdbook.cfl import CommonSpace
    torch.manual_seed(0)
    cs = CommonSpace(5, [3, 6], h=4)
    fs, fts = torch.randn(2, 5, 4, 4), [torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)]
    conv = lambda x, m, pad: F.conv2d(x, m.weight, padding=pad)
    def block(x, b):
        short = conv(x, b.short, 0) if isinstance(b.short, torch.nn.Conv2d) else x
        return F.relu(conv(F.relu(conv(x, b.conv1, 1)), b.conv2, 1) + short)
    def extract(x):
        for b in cs.extractor: x = block(x, b)
        return x
    hs = extract(F.relu(conv(fs, cs.align_s[0], 0)))
    hts = [extract(F.relu(conv(f, a[0], 0))) for f, a in zip(fts, cs.align_t)]
    recs = [conv(F.relu(conv(h, d[0], 1)), d[2], 0) for h, d in zip(hts, cs.dec_t)]
    got = cs(fs, fts)
    torch.testing.assert_close(got[0], hs)
    for a, b in zip(got[1] + got[2], hts + recs): torch.testing.assert_close(a, b)
    assert isinstance(cs.extractor[0].short, torch.nn.Conv2d) and not isinstance(cs.extractor[1].short, torch.nn.Conv2d)


def test_feature_loss_terms_each_count(float64):
    "On the setting of the formula test, each term of (C2) (the MMD² and the reconstruction MSE of each expert) is"
    " at least 1e-4 of the feature loss, so the 1e-10 tolerance there fails when any one of them is left out; and"
    " the feature term reaches the loss multiplied by λ."
    torch.manual_seed(0)
    tasks = [torch.tensor([0, 2, 5, 7]), torch.tensor([1, 3, 4, 6, 8, 9])]
    student = create_model("cnn_tiny", 10, 1)
    bank = TeacherBank([create_model(a, len(t), 1) for a, t in zip(("cnn_small", "vgg8"), tasks)])
    x = torch.randn(12, 1, 16, 16)
    method = CFL(hidden=8)
    method.setup(student, bank, (x, None, None))
    with torch.no_grad():
        s, t = student(x), bank(x, feats=True)
        fts = method._resized([f[-1] for f in t.feats])
        hs, hts, recs = method.common(s.feats[-1], fts)
        unit = lambda h: h.flatten(1) / h.flatten(1).norm(dim=1, keepdim=True)
        terms = [_mmd_by_hand(unit(hs), unit(h)) for h in hts] + [float((r - f).pow(2).mean()) for r, f in zip(recs, fts)]
        total = float(method.feature_loss(s, t))
    assert math.isclose(total, sum(terms), rel_tol=1e-10)
    assert min(terms) > 1e-4 * total, terms


def test_init_choices_and_the_dead_bandwidths(float64):
    "init='pytorch' keeps PyTorch's default (|w| ≤ 1/√fan_in), 'kaiming' draws N(0, 2/fan_in); a bad init is refused."
    " On unit rows of rectified Gaussians (2,048 entries) the gradient of the σ ≤ 0.2 kernels is < 1e-5 of σ = 1's."
    from kdbook.cfl import CommonSpace
    for init in ("pytorch", "kaiming"):
        torch.manual_seed(0)
        w = CommonSpace(64, [64], h=32, init=init).dec_t[0][0].weight.detach()     # 3×3 conv, fan_in 288
        fan_in = w[0].numel()
        if init == "pytorch": assert float(w.abs().max()) <= 1 / math.sqrt(fan_in)
        else: assert abs(float(w.std()) / math.sqrt(2 / fan_in) - 1) < 0.02
    with pytest.raises(ValueError, match="init must be one of 'kaiming', 'pytorch', got 'xavier'"): CFL(init="xavier")
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(F.relu(torch.randn(32, 2048, generator=g)), dim=1) for _ in range(2))
    a.requires_grad_()
    norm = {s: float(torch.autograd.grad(mmd(a, b, (s,)), a)[0].norm()) for s in SIGMAS}
    assert all(norm[s] < 1e-5 * norm[1.0] for s in SIGMAS if s <= 0.2) and norm[2.0] > 0.1 * norm[1.0], norm
