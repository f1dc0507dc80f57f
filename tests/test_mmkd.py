"Chapter 14, MMKD: the hypergradient against finite differences and the public code's replay, the functional SGD step, the hard buffer, checkpoint and resume, bad input, `kdbook run`."
import pytest
import torch

from kdbook.data import load_dataset
from kdbook.learner import Callback, Distiller, TrainConfig
from kdbook.study import train_teachers
from kdbook.models import create_model
from kdbook.mmkd import MMKD, HardBuffer, MetaWeightNet, hypergradient, outer_of, sgd_step, small_lookahead
from conftest import quick_run

OPTS = {"plain": dict(lr=0.02), "heavy ball": dict(lr=0.02, momentum=0.9, weight_decay=5e-4),
        "Nesterov": dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)}


def along(g, v): return float(sum((g[k] * v[k]).sum() for k in v))


@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("feat", ["gram", "rows"])
def test_exact_hypergradient_matches_central_differences(opt, feat):
    prob, phi, theta, bufs = small_lookahead(feat=feat, seed=1)
    g = torch.Generator().manual_seed(2)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in phi.items()}
    f, eps = outer_of(prob, theta, bufs, OPTS[opt]), 1e-6
    fd = float(f({k: phi[k] + eps * v[k] for k in phi}) - f({k: phi[k] - eps * v[k] for k in phi})) / (2 * eps)
    exact = along(hypergradient(prob, phi, theta, bufs, OPTS[opt]), v)
    assert abs(exact - fd) <= 1e-4 * abs(fd), (exact, fd)


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
                                     ({"hypergrad": "second"}, "hypergrad must be one of 'exact', 'first_order', 'replay', got 'second'"),
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
    assert {"aver", "ebkd", "camkd", "aekd", "mmkd"} <= set(runs) and all(r["status"] == "ok" for r in runs.values())
    w = runs["mmkd"]["record"]["logit_weights_mean"]
    assert len(w) == 3 and abs(sum(w) - 1) < 1e-3
