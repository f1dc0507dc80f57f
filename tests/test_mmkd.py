"Chapter 14, MMKD: the hypergradient against finite differences and the public code's replay, the functional SGD step, the hard buffer, checkpoint and resume, bad input, `kdbook run`."
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdbook.data import load_dataset
from kdbook.learner import Callback, Distiller, TrainConfig
from kdbook.study import train_teachers
from kdbook.models import TeacherBank, create_model
from kdbook.mmkd import (MMKD, HardBuffer, LookAhead, MetaWeightNet, gram_meta_input, hypergradient,
                         logit_meta_input, outer_of, sgd_step, small_lookahead)
from conftest import quick_run

OPTS = {"plain": dict(lr=0.02), "heavy ball": dict(lr=0.02, momentum=0.9, weight_decay=5e-4),
        "Nesterov": dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)}


def along(g, v): return float(sum((g[k] * v[k]).sum() for k in v))


@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("feat", ["gram", "rows"])
def test_exact_hypergradient_matches_central_differences(opt, feat):
    "Differences' own error here is below 6e-9 (relative) and dropping weight decay moves the hypergradient "
    "by 6e-5 to 1.2e-4: a tolerance of 1e-6 sees it."
    prob, phi, theta, bufs = small_lookahead(feat=feat, seed=1)
    g = torch.Generator().manual_seed(2)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in phi.items()}
    f, eps = outer_of(prob, theta, bufs, OPTS[opt]), 1e-6
    fd = float(f({k: phi[k] + eps * v[k] for k in phi}) - f({k: phi[k] - eps * v[k] for k in phi})) / (2 * eps)
    exact = along(hypergradient(prob, phi, theta, bufs, OPTS[opt]), v)
    assert abs(exact - fd) <= 1e-6 * abs(fd), (exact, fd)


def test_replay_is_exact_for_heavy_ball_only_and_first_order_for_one_step():
    prob, phi, theta, bufs = small_lookahead()
    ex, rp = (hypergradient(prob, phi, theta, bufs, OPTS["heavy ball"], m) for m in ("exact", "replay"))
    for k in phi: torch.testing.assert_close(rp[k], ex[k], rtol=1e-9, atol=1e-12)
    ex, rp = (hypergradient(prob, phi, theta, bufs, OPTS["Nesterov"], m) for m in ("exact", "replay"))
    assert max(float((ex[k] - rp[k]).abs().max()) for k in phi) > 1e-3 * max(float(ex[k].abs().max()) for k in phi)
    prob.steps = ("match",)
    for opt in OPTS.values():
        ex, fo = (hypergradient(prob, phi, theta, bufs, opt, m) for m in ("exact", "first_order"))
        for k in phi: torch.testing.assert_close(fo[k], ex[k], rtol=1e-9, atol=1e-12)
    prob.steps = ()
    assert all((v == 0).all() for v in hypergradient(prob, phi, theta, bufs, OPTS["Nesterov"]).values())


@pytest.mark.parametrize("seed", range(4))
def test_sgd_step_is_torch_sgd(seed):
    g = torch.Generator().manual_seed(seed)
    mom = [0.0, 0.9, 0.5, 0.99][seed]
    nest, wd, lr = bool(seed % 2) and mom > 0, [0.0, 1e-3, 5e-4, 0.1][seed], float(torch.rand((), generator=g)) + 0.01
    p0 = {"w": torch.randn(5, 3, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g, dtype=torch.float64)}
    ref = {k: v.clone().requires_grad_() for k, v in p0.items()}
    opt = torch.optim.SGD(ref.values(), lr=lr, momentum=mom, nesterov=nest, weight_decay=wd)
    p, b = p0, {}
    for _ in range(4):
        gr = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in p0.items()}
        for k in ref: ref[k].grad = gr[k].clone()
        opt.step()
        p, b = sgd_step(p, gr, b, lr, mom, nest, wd)
    for k in ref: torch.testing.assert_close(p[k], ref[k].detach(), rtol=1e-12, atol=1e-12)


def test_hard_buffer_fills_then_replaces_only_misclassified():
    hb = HardBuffer(6)
    x, y = torch.arange(3.0)[:, None], torch.arange(3)
    hb.allocate((x, y))
    hb.add(x, y, torch.ones(3, dtype=torch.bool)); hb.add(x + 3, y + 3, torch.zeros(3, dtype=torch.bool))
    assert hb.y.tolist() == list(range(6)) and int(hb.filled) == 6
    hb.add(x + 10, y + 10, torch.tensor([False, True, False]))
    assert sorted(hb.y.tolist())[-1] == 11 and 10 not in hb.y.tolist() and 12 not in hb.y.tolist()
    assert len(set(hb.sample(6)[1].tolist())) == 6
    assert hb.class_counts(12).sum() == 6
    with pytest.raises(ValueError, match="buffer_size=6 must be a multiple of the batch size 4"):
        hb.allocate((torch.zeros(4, 1), torch.zeros(4)))
    with pytest.raises(RuntimeError, match="empty"): HardBuffer(4).sample(2)


@pytest.fixture(scope="module")
def digits_teachers():
    digits = load_dataset("digits")
    return digits, train_teachers(["cnn_tiny"] * 2, digits, seeds=range(2), cfg=TrainConfig(epochs=1), progress=False, verbose=False)


def test_resumed_run_ends_with_identical_weights(digits_teachers, tmp_path):
    digits, teachers = digits_teachers
    cfg = TrainConfig(epochs=2, batch_size=64)
    class Kill(Callback):
        def after_step(self, learn):
            if learn.global_step == learn.steps_per_epoch + 3: raise KeyboardInterrupt("killed in the second epoch")
    def run(out, resume=False, callbacks=()):
        torch.manual_seed(0)
        return Distiller(create_model("cnn_tiny", 10, 1), MMKD(beta=10.0, period=2), digits, teachers, cfg, out_dir=out,
                         resume=resume, progress=False, callbacks=callbacks)
    full = run(tmp_path / "full"); full.fit()
    with pytest.raises(KeyboardInterrupt): run(tmp_path / "cut", callbacks=[Kill()]).fit()
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "epoch-0001"
    resumed = run(tmp_path / "cut", resume=True); resumed.fit()
    a, b = full.method, resumed.method
    assert b.meta_opt.state and float(b.meta_opt.state[next(b.nets.parameters())]["step"]) == float(a.meta_opt.state[next(a.nets.parameters())]["step"])
    for (k, v), w in zip([*full.student.state_dict().items(), *a.state_dict().items()], [*resumed.student.state_dict().values(), *b.state_dict().values()]):
        assert torch.equal(v, w), k
    for p, q in zip(a.nets.parameters(), b.nets.parameters()):
        for key in ("exp_avg", "exp_avg_sq"): assert torch.equal(a.meta_opt.state[p][key], b.meta_opt.state[q][key])
    assert full.history[-1]["test_top1"] == resumed.history[-1]["test_top1"]


@pytest.mark.parametrize("kw, msg", [({"period": 0}, "period must be an int >= 1, got 0"),
                                     ({"lookahead": -1}, "lookahead must be an int >= 0, got -1"),
                                     ({"beta": -1.0}, "beta"),
                                     ({"hypergrad": "second"},
                                      "hypergrad must be one of 'exact', 'first_order', 'replay', 'reverse', got 'second'"),
                                     ({"lookahead_loss": "ce"}, "lookahead_loss must be one of 'match', 'eq9', got 'ce'"),
                                     ({"meta_input": "softmax"}, "meta_input must be one of"),
                                     ({"ce_step": "yes"}, "ce_step must be True or False")])
def test_bad_settings_are_refused_by_name(kw, msg):
    with pytest.raises(ValueError, match=msg): MMKD(**kw)


def test_bad_setups_are_refused_by_name(digits_teachers):
    digits, teachers = digits_teachers
    with pytest.raises(ValueError, match="buffer_size=96 must be a multiple of the batch size 64"):
        Distiller(create_model("cnn_tiny", 10, 1), MMKD(buffer_size=96), digits, teachers, TrainConfig(epochs=1), progress=False).setup()
    d = Distiller(create_model("cnn_tiny", 10, 1), MMKD(), digits, teachers, TrainConfig(epochs=1, optimizer="adam", lr=1e-3), progress=False)
    with pytest.raises(ValueError, match="follows torch.optim.SGD"): d.fit()
    with pytest.raises(ValueError, match="Gram rows .* of width 192, got width 120"):
        MetaWeightNet(64 * 3, 2, "Gram rows (batch size × (M + 1))")(torch.randn(40, 40 * 3))


def test_cli_runs_mmkd_beside_the_baselines(cli_data, tmp_path):
    res = quick_run(tmp_path, cli_data, methods="aver,ebkd,camkd,aekd,mmkd")
    runs = {r["method"]: r for r in res["runs"].values()}
    assert {"aver", "ebkd", "camkd", "aekd", "mmkd"} <= set(runs) and all(r["status"] in ("ok", "diverged") for r in runs.values())   # short runs: finished
    w = runs["mmkd"]["record"]["logit_weights_mean"]
    assert len(w) == 3 and abs(sum(w) - 1) < 1e-3


# ------------------------------------------------------------------------------------------------ meta_step end to end
SETTINGS = {"momentum": dict(momentum=0.9), "Nesterov": dict(momentum=0.9, nesterov=True),
            "weight decay": dict(weight_decay=0.05),
            "all": dict(momentum=0.9, nesterov=True, weight_decay=0.05)}
LR = 0.2


def smooth(net: torch.nn.Module) -> torch.nn.Module:
    "`net` with SiLU for every ReLU: a ReLU network's gradient jumps where a unit crosses 0, so after two "
    "look-ahead steps the outer loss jumps in φ (every ~1e-5 along a random direction here) and differences "
    "do not converge."
    for mod in list(net.modules()):
        for name, child in mod.named_children():
            if isinstance(child, torch.nn.ReLU): setattr(mod, name, torch.nn.SiLU())
    return net


def meta_case(settings: dict, B=8, C=5, M=2):
    "An MMKD set up on a float64 `cnn_tiny` student and M random teachers, the student's torch SGD (with "
    "`settings`) after one step on random gradients (momentum buffers filled), a learner stand-in, a meta "
    "batch and φ."
    torch.manual_seed(0)
    student = smooth(create_model("cnn_tiny", C, 1).train())
    bank = TeacherBank([create_model("cnn_tiny", C, 1) for _ in range(M)])
    x, y = torch.randn(B, 1, 12, 12), torch.randint(0, C, (B,))
    m = MMKD(beta=10.0, buffer_size=B)
    m.setup(student, bank, (x, y, None))
    smooth(m.regressors)
    params = [*student.parameters(), *m.regressors.parameters()]
    opt = torch.optim.SGD(params, lr=LR, **settings)
    for p in params: p.grad = 0.1 * torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    m._last = (x, y, torch.full((B, M), 1 / M), torch.full((B, M), 1 / M))
    learn = SimpleNamespace(opt=opt, bank=bank, global_step=1, student=student)
    phi = {f"{n}.{k}": p.detach().clone() for n, net in m.nets.items() for k, p in net.named_parameters()}
    return m, learn, torch.randn(B, 1, 12, 12), torch.randint(0, C, (B,)), phi


def meta_step_grads(m, learn, x, y) -> dict:
    "The gradients `meta_step` gives the meta-nets, read as Adam is about to use them."
    seen, step = {}, m.meta_opt.step
    def spy():
        seen.update({f"{n}.{k}": p.grad.clone()
                     for n, net in m.nets.items() for k, p in net.named_parameters()})
        step()
    m.meta_opt.step = spy
    m.meta_step(learn, x, y)
    return seen


def reference_hypergradient(m, learn, x, y, phi: dict, opt: dict) -> dict:
    "`hypergradient` of the look-ahead `meta_step` should build (two matching steps, one CE step, meta inputs"
    " at θ), with the SGD settings `opt` given here rather than read by the code under test."
    with torch.no_grad():
        t = learn.bank(x, feats=True)
        t_logits, t_maps = t.logits.clone(), [f[-1].clone() for f in t.feats]
    model = m.model[0]
    theta = {k: p.detach() for k, p in model.named_parameters()}
    bufs = {k: learn.opt.state[p].get("momentum_buffer") for k, p in model.named_parameters()}
    steps = ("match", "match", "ce")
    prob = LookAhead(model, x, y, t_logits, t_maps, dict(m.nets), {}, steps, m.T, m.alpha, m.beta)
    with torch.no_grad(): z, _, fmap = prob.forward(theta)
    prob.inputs = {"logit": logit_meta_input(t_logits, z), "feat": gram_meta_input(t_maps, fmap)}
    return hypergradient(prob, phi, theta, bufs, opt)


def torch_sgd_outer(m, learn, x, y, phi: dict, steps=("match", "match", "ce")) -> float:
    "The outer CE after the look-ahead (two weighted matching steps, one CE step) taken by a copy of the "
    "student's own `torch.optim.SGD` (its param groups and momentum buffers), the losses written out from Eq."
    " 6, 7 and 12."
    student, regs = copy.deepcopy(learn.student).train(), copy.deepcopy(m.regressors).train()
    nets = copy.deepcopy(m.nets)
    with torch.no_grad():
        for k, p in nets.named_parameters(): p.copy_(phi[k])
    opt = torch.optim.SGD([*student.parameters(), *regs.parameters()], lr=1.0)
    opt.load_state_dict(copy.deepcopy(learn.opt.state_dict()))   # loading keeps the buffers' storage
    with torch.no_grad():
        t = learn.bank(x, feats=True)
        t_logits, t_maps = t.logits.clone(), [f[-1].clone() for f in t.feats]
        s = student(x)
        w_logit = nets["logit"](torch.cat([*t_logits, s.logits], 1))
        w_feat = nets["feat"](torch.cat([f.flatten(1) @ f.flatten(1).T for f in (*t_maps, s.feats[-1])], 1))
    T = m.T
    for kind in steps:
        opt.zero_grad()
        s = student(x)
        if kind == "ce": loss = F.cross_entropy(s.logits, y)
        else:
            log_ps = F.log_softmax(s.logits / T, 1)
            kl = torch.stack([(F.softmax(u / T, 1) * (F.log_softmax(u / T, 1) - log_ps)).sum(1)
                              for u in t_logits], 1)
            mse = torch.stack([((r(s.feats[-1]) - f) ** 2).flatten(1).mean(1)
                               for r, f in zip(regs, t_maps)], 1)
            loss = m.alpha * (w_logit * T * T * kl).sum(1).mean() + m.beta * (w_feat * mse).sum(1).mean()
            if kind == "eq9": loss = loss + m.gamma * F.cross_entropy(s.logits, y)
        loss.backward()
        opt.step()
    with torch.no_grad(): return float(F.cross_entropy(student(x).logits, y))


def dropped(settings: dict) -> list:
    "The settings with one of them switched off at a time (Nesterov goes with momentum)."
    out = []
    for k in settings:
        d = {**settings, k: type(settings[k])(0)}
        if k == "momentum": d.pop("nesterov", None)
        out.append(d)
    return out


@pytest.mark.parametrize("settings", list(SETTINGS))
def test_meta_step_gradient_is_the_hypergradient_under_the_optimisers_settings(settings, float64):
    "The meta-nets' gradients after one `meta_step` equal `hypergradient` under the SGD settings written out "
    "here, to 1e-9 (relative); with any one setting dropped the hypergradient moves by more than 10x that."
    m, learn, x, y, phi = meta_case(SETTINGS[settings])
    got = meta_step_grads(m, learn, x, y)
    full = dict(lr=LR, **SETTINGS[settings])
    ref = reference_hypergradient(m, learn, x, y, phi, full)
    scale = max(float(v.abs().max()) for v in ref.values())
    gap = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a) / scale
    assert gap(got, ref) < 1e-9
    for d in dropped(SETTINGS[settings]):
        assert gap(reference_hypergradient(m, learn, x, y, phi, dict(lr=LR, **d)), ref) > 1e-8, d


@pytest.mark.parametrize("settings", list(SETTINGS))
def test_meta_step_gradient_matches_differences_through_torch_sgd(settings, float64):
    "Central differences of the outer loss after a look-ahead taken by torch's own SGD (a copy of the "
    "student's optimizer and its momentum buffers), along three random directions of φ, match `meta_step`'s "
    "gradient to 1e-6 (relative; the differences' own error at ε = 1e-6 is 1e-8 to 6e-8); the look-ahead "
    "without any one of the optimizer's settings misses them by more than 10x that (weight decay, the "
    "smallest, by 5%)."
    m, learn, x, y, phi = meta_case(SETTINGS[settings])
    got = meta_step_grads(m, learn, x, y)
    g, eps = torch.Generator().manual_seed(5), 1e-6
    for _ in range(3):
        v = {k: torch.randn(p.shape, generator=g) for k, p in phi.items()}
        fd = (torch_sgd_outer(m, learn, x, y, {k: phi[k] + eps * v[k] for k in phi})
              - torch_sgd_outer(m, learn, x, y, {k: phi[k] - eps * v[k] for k in phi})) / (2 * eps)
        assert abs(along(got, v) - fd) < 1e-6 * abs(fd), (along(got, v), fd)
        for d in dropped(SETTINGS[settings]):
            wrong = along(reference_hypergradient(m, learn, x, y, phi, dict(lr=LR, **d)), v)
            assert abs(wrong - fd) > 1e-5 * abs(fd), (d, wrong, fd)


def test_nesterov_adjoint_replay_matches_differences_and_the_codes_does_not():
    "Reverse-HG with Nesterov's adjoint (θ moves η(1+μ) along the step's gradient and ημ² along the old "
    "momentum) matches central differences of the three-step look-ahead to 1e-6 (relative); the code's "
    "heavy-ball adjoint misses them by more than 1%; under heavy ball both are the same computation."
    prob, phi, theta, bufs = small_lookahead(seed=3)
    g = torch.Generator().manual_seed(4)
    for name in ("Nesterov", "heavy ball"):
        f, eps = outer_of(prob, theta, bufs, OPTS[name]), 1e-6
        for _ in range(2):
            v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in phi.items()}
            fd = float(f({k: phi[k] + eps * v[k] for k in phi}) - f({k: phi[k] - eps * v[k] for k in phi})) / (2 * eps)
            rev = along(hypergradient(prob, phi, theta, bufs, OPTS[name], "reverse"), v)
            code = along(hypergradient(prob, phi, theta, bufs, OPTS[name], "replay"), v)
            assert abs(rev - fd) <= 1e-6 * abs(fd), (name, rev, fd)
            if name == "Nesterov": assert abs(code - fd) > 1e-2 * abs(fd), (code, fd)
            else: assert abs(code - rev) <= 1e-9 * abs(fd)


@pytest.mark.parametrize("settings", ["Nesterov", "all"])
def test_eq9_lookahead_meta_gradient_matches_differences_through_torch_sgd(settings, float64):
    "The paper's look-ahead (three steps on Eq. 9: CE + α·KL + β·feature) taken by a copy of torch's SGD: "
    "central differences along two directions of φ match `meta_step`'s gradient to 1e-5 (relative; the "
    "differences' own error is up to 6e-8 absolute); the code's look-ahead (matching steps, then CE) misses "
    "them by more than 100x that."
    m, learn, x, y, phi = meta_case(SETTINGS[settings])
    m.lookahead, m.ce_step, m.lookahead_loss = 3, False, "eq9"
    got = meta_step_grads(m, learn, x, y)
    g, eps = torch.Generator().manual_seed(6), 1e-6
    for _ in range(2):
        v = {k: torch.randn(p.shape, generator=g) for k, p in phi.items()}
        diff = lambda steps: (torch_sgd_outer(m, learn, x, y, {k: phi[k] + eps * v[k] for k in phi}, steps)
                              - torch_sgd_outer(m, learn, x, y, {k: phi[k] - eps * v[k] for k in phi}, steps)) / (2 * eps)
        fd, code = diff(("eq9",) * 3), diff(("match", "match", "ce"))
        assert abs(along(got, v) - fd) < 1e-5 * abs(fd), (along(got, v), fd)
        assert abs(code - fd) > 1e-3 * abs(fd), (code, fd)
