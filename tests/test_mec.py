"Chapter 13, MEC: free energies and head choice against brute force, the memory, the method's terms and switches, `kdbook run --memory`."
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdbook.cfl import KA, Amalgamation
from kdbook.core import kd_loss
from kdbook.data import load_dataset
from kdbook.learner import Distiller, TrainConfig, make_method
from kdbook.models import create_model
from kdbook.mec import (MEC, channel_kl, first_experts, free_energy, head_free_energies, head_layout, mec_scores, memory_data,
                        reconstruction_norm)
from conftest import quick_run


@pytest.mark.parametrize("seed", range(3))
def test_union_softmax_factorises_into_head_choice_and_class(seed):
    g = torch.Generator().manual_seed(seed)
    tasks = [torch.tensor([2, 7]), torch.tensor([0, 1, 9]), torch.tensor([3, 4, 5, 6, 8])]
    index, valid = head_layout(tasks)
    u, y = torch.randn(40, 10, generator=g, dtype=torch.float64) * 4, torch.randint(0, 10, (40,), generator=g)
    Fm = head_free_energies(u, index, valid)
    for i in range(40):
        m = next(k for k, t in enumerate(tasks) if y[i] in t)
        within = F.log_softmax(u[i, tasks[m]], -1)[(tasks[m] == y[i]).nonzero().item()]
        head = F.log_softmax(-Fm[i], -1)[m]
        torch.testing.assert_close(F.log_softmax(u[i], -1)[y[i]], within + head)
        assert math.isclose(Fm[i, m].item(), -torch.logsumexp(u[i, tasks[m]], -1).item(), rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_scores_pick_the_head_of_lowest_free_energy_then_its_top_class(seed):
    g = torch.Generator().manual_seed(seed)
    tasks = [torch.tensor([0, 5]), torch.tensor([1, 2, 3]), torch.tensor([4, 6, 7, 8, 9])]
    index, valid = head_layout(tasks)
    u = torch.randn(64, 10, generator=g) * 3
    s = mec_scores(u, index, valid)
    for i in range(64):
        energies = [free_energy(u[i, t]).item() for t in tasks]
        m = min(range(3), key=energies.__getitem__)
        assert s[i].argmax().item() == tasks[m][u[i, tasks[m]].argmax()].item()
        order = sorted(range(3), key=energies.__getitem__)             # top-k walks the heads by −F
        first = s[i].topk(len(tasks[order[0]])).indices.sort().values
        assert first.tolist() == tasks[order[0]].tolist()


def test_free_energy_and_kd_see_a_head_shift_differently():
    h, v = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(free_energy(h + 1.5), free_energy(h) - 1.5)
    torch.testing.assert_close(kd_loss(h + 1.5, v), kd_loss(h, v))
    with pytest.raises(ValueError, match="T must be"): free_energy(h, T=-1)


def test_channel_kl_and_reconstruction_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 5, 2, 2, generator=g, dtype=torch.float64)
    ref = F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), reduction="none", log_target=True).sum(1).mean()
    torch.testing.assert_close(channel_kl(a, b), ref)
    assert channel_kl(a, b) > 0 and abs(channel_kl(a, a).item()) < 1e-12
    torch.testing.assert_close(reconstruction_norm(a, b), (a - b).flatten(1).norm(dim=1).mean())


def _experts(am):
    torch.manual_seed(0)
    return [create_model(("cnn_small", "resnet8")[m % 2], len(t), 1) for m, t in enumerate(am.tasks)]


def test_memory_selects_the_nearest_to_each_class_mean_and_refuses_bad_sizes():
    ds = load_dataset("digits")
    am = Amalgamation.split(ds, 2, seed=1)
    ex = _experts(am)
    mem = memory_data(am, ex, 4)
    assert torch.bincount(mem.train.y).tolist() == [4] * 10
    for m, (t, e) in enumerate(zip(am.tasks, ex)):   # brute force: features of every sample of each class, nearest 4 to the mean
        e.eval()
        for c in t.tolist():
            idx = (ds.train.y == c).nonzero().squeeze(1)
            x = (ds.train.x[idx].float() / 255 if ds.train.x.dtype == torch.uint8 else ds.train.x[idx])
            x = (x - torch.tensor(ds.mean).view(1, -1, 1, 1)) / torch.tensor(ds.std).view(1, -1, 1, 1)
            with torch.no_grad(): f = e(x).pooled
            near = idx[(f - f.mean(0)).pow(2).sum(1).argsort()[:4]]
            chosen = mem.train.x[mem.train.y == c]
            assert sorted(chosen.flatten(1).sum(1).tolist()) == sorted(ds.train.x[near].flatten(1).sum(1).tolist())
    with pytest.raises(ValueError, match="memory size k must be an int >= 1, got 0"): memory_data(am, ex, 0)
    with pytest.raises(ValueError, match="repeat must be an int >= 1"): memory_data(am, ex, 3, repeat=0)
    with pytest.raises(ValueError, match="2 class groups but 1 experts"): memory_data(am, ex[:1], 3)
    sub = first_experts(Amalgamation.split(ds, 5, seed=0), 2)
    assert sub.data.n_classes == 4 and sorted(torch.cat(sub.tasks).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("settings", [{}, {"merl": False}, {"cal": False}, {"delta": -2.0, "lam2": 1.0}])
def test_mec_trains_and_reports_both_task_accuracies(settings):
    ds = load_dataset("digits")
    am = Amalgamation.split(ds, 5, seed=0)
    ex = _experts(am)
    torch.manual_seed(0)
    d = Distiller(create_model("cnn_small", 10, 1), make_method("mec", **settings), memory_data(am, ex, 10, repeat=2), teachers=ex,
                  cfg=TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-3), progress=False, tasks=am.tasks)
    h = d.fit()[-1]
    assert math.isfinite(h["train_loss"]) and len(h["test_tasks"]) == 5 and len(h["test_tasks_any"]) == 5
    assert all(a >= b - 1e-9 for a, b in zip(h["test_tasks"], h["test_tasks_any"]))   # the task-aware reading is never lower
    assert d.method.record()["heads_from_experts"] == ([True] * 5 if settings.get("cal", True) else [])


def test_mec_with_both_modules_off_is_ka_with_labels():
    ds = load_dataset("digits")
    am = Amalgamation.split(ds, 2, seed=0)
    ex = _experts(am)
    def loss(method):
        torch.manual_seed(3)
        d = Distiller(create_model("cnn_small", 10, 1), method, ds, teachers=ex, cfg=TrainConfig(epochs=1, batch_size=16), progress=False, tasks=am.tasks)
        d.setup()
        x, y, _ = next(iter(d.train_dl))
        return d.method.loss((x, y), d.student(x), d.bank(x, feats=True))["loss"]
    torch.testing.assert_close(loss(MEC(merl=False, cal=False, T=1.0, lam2=1.0)), loss(KA(gamma=1.0)))


def test_mec_with_both_modules_off_at_its_defaults_is_labels_plus_a_tenth_of_soft_concat_kd():
    "MEC(merl=False, cal=False) at T = 4, λ2 = 0.1: CE(student, y) + 0.1·T²·CE(softmax(concat/T), softmax(student/T)), "
    "the experts' logits placed at their classes, written out in float64 loops; not KA with labels (T = 1, weight 1)."
    ds = load_dataset("digits")
    am = Amalgamation.split(ds, 2, seed=0)
    ex = _experts(am)
    torch.manual_seed(3)
    d = Distiller(create_model("cnn_small", 10, 1), MEC(merl=False, cal=False), ds, teachers=ex,
                  cfg=TrainConfig(epochs=1, batch_size=16), progress=False, tasks=am.tasks)
    d.setup()
    x, y, _ = next(iter(d.train_dl))
    s, t = d.student(x), d.bank(x, feats=True)
    got = float(d.method.loss((x, y), s, t)["loss"].detach())
    z = s.logits.detach().double()
    concat = torch.zeros(len(y), 10, dtype=torch.float64)
    for task, v in zip(am.tasks, t.logits):
        for j, c in enumerate(task.tolist()): concat[:, c] = v[:, j].double()
    def soft_ce(i, T):   # −Σ_c softmax(concat/T)[c] · log softmax(z/T)[c]
        ec, ez = [math.exp(float(concat[i, c]) / T) for c in range(10)], [math.exp(float(z[i, c]) / T) for c in range(10)]
        return -sum(ec[c] / sum(ec) * math.log(ez[c] / sum(ez)) for c in range(10))
    total = ka_labels = 0.0
    for i in range(len(y)):
        ez = [math.exp(float(z[i, c])) for c in range(10)]
        ce = -math.log(ez[int(y[i])] / sum(ez))
        total += (ce + 0.1 * 16 * soft_ce(i, 4.0)) / len(y)
        ka_labels += (ce + soft_ce(i, 1.0)) / len(y)
    assert math.isclose(got, total, rel_tol=1e-5)
    assert abs(got - ka_labels) > 1e-2   # KA with labels is another loss at these settings


@pytest.mark.parametrize("kw,msg", [({"delta": float("inf")}, "delta must be a finite number, got inf"),
                                    ({"lam1": -0.5}, "lam1 must be"), ({"hidden": 1.5}, "hidden must be an int >= 0"),
                                    ({"merl": 1}, "merl must be True or False")])
def test_mec_refuses_bad_settings(kw, msg):
    with pytest.raises(ValueError, match=msg): MEC(**kw)


def test_cli_runs_mec_on_the_memory(tmp_path, cli_data):
    res = quick_run(tmp_path, cli_data, "--experts", "5", "--memory", "5", "--set", "mec.delta=-3", methods="ka,cfl,mec")
    for m in ("ka", "cfl", "mec"):
        run = res["runs"][f"{m}/0"]
        assert run["status"] in ("ok", "diverged") and len(run["tasks"]) == 5   # one epoch: finished, maybe at chance and len(run["tasks_any"]) == 5, run
    assert res["runs"]["mec/0"]["hparams"]["delta"] == -3.0 and len(res["runs"]["mec/0"]["record"]["heads_from_experts"]) == 5


@pytest.mark.parametrize("argv,msg", [(["--memory", "5"], "--memory 5 selects exemplars under each expert: it needs --experts N"),
                                      (["--experts", "2", "--memory", "0"], "must be an integer >= 1, got '0'"),
                                      (["--experts", "2", "--methods", "mec", "--set", "mec.delta=nan"], "delta must be a finite number"),
                                      (["--experts", "2", "--memory", "5000"], "memory size k=5000 is more than the")])
def test_cli_refuses_bad_memory_and_delta(tmp_path, monkeypatch, capsys, argv, msg):
    from kdbook import cli
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    try: code = cli.main(["run", *argv, "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--out", str(tmp_path / "o")])
    except SystemExit as e: code = e.code   # argparse refuses a bad flag value by exiting
    assert code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "cache" / "teachers").exists()   # refused before any expert trained


# ------------------------------------------------------------------------------------------------ the terms against the paper
def _mec_over(tasks, **kw) -> MEC:
    "A MEC whose class groups are `tasks` (what `prepare` sets from a run's tasks), for calling its loss "
    "terms directly."
    m = MEC(**kw)
    m._tasks = [torch.as_tensor(t) for t in tasks]
    m._index, m._valid = head_layout(m._tasks)
    m._task_of = torch.empty(sum(len(t) for t in tasks), dtype=torch.int64)
    for k, t in enumerate(m._tasks): m._task_of[t] = k
    return m


def _anchor_by_hand(u, y, tasks, delta) -> float:
    "Eq. 9 summed over the heads, in float64 loops: per head m, the mean over the batch's samples with y in "
    "Y_m of (F^m(x) − Δ)², F^m(x) = −log Σ_{c∈Y_m} exp h[c] (Eq. 8); a head with no such sample adds nothing."
    total = 0.0
    for t in tasks:
        inside = [i for i in range(len(y)) if int(y[i]) in t]
        if inside:
            F_m = [-math.log(sum(math.exp(float(u[i, c])) for c in t)) for i in inside]
            total += sum((f - delta) ** 2 for f in F_m) / len(inside)
    return total


def _head_kd_by_hand(u, experts, tasks, T) -> float:
    "Σ_m T²·(1/B) Σ_i Σ_{c} p_t log(p_t / p_s), p_t = softmax(expert m / T), p_s = softmax(head m / T) over "
    "Y_m (Eq. 10 read as KD's KL), in float64 loops."
    total, B = 0.0, len(u)
    for t, v in zip(tasks, experts):
        for i in range(B):
            zt = [math.exp(float(v[i, j]) / T) for j in range(len(t))]
            zs = [math.exp(float(u[i, c]) / T) for c in t]
            pt, ps = [a / sum(zt) for a in zt], [a / sum(zs) for a in zs]
            total += T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps)) / B
    return total


@pytest.mark.parametrize("seed", range(3))
def test_anchor_loss_and_head_kd_match_the_paper_written_out(seed):
    "Uneven heads (2, 3 and 5 classes), Δ = −3, T = 2.5, logits of scale 3; seed 2 leaves head 0 without "
    "in-stage samples."
    g = torch.Generator().manual_seed(seed)
    tasks = [[2, 7], [0, 1, 9], [3, 4, 5, 6, 8]]
    m = _mec_over(tasks, T=2.5, delta=-3.0)
    u = 3 * torch.randn(12, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (12,), generator=g)
    if seed == 2: y = torch.tensor([0, 1, 9, 3, 4, 5, 6, 8, 0, 3, 3, 9])
    experts = [2 * torch.randn(12, len(t), generator=g, dtype=torch.float64) for t in tasks]
    assert math.isclose(float(m.anchor_loss(u, y)), _anchor_by_hand(u, y, tasks, -3.0), rel_tol=1e-12)
    kd = float(m.head_kd(u, SimpleNamespace(logits=experts)))
    assert math.isclose(kd, _head_kd_by_hand(u, experts, tasks, 2.5), rel_tol=1e-12)


def test_anchor_optimum_puts_each_heads_in_stage_mean_at_delta():
    "A shift c_m added to head m's logits moves F^m by −c_m, so the anchor loss of the shifted heads is Σ_m "
    "mean(F^m − c_m − Δ)²: its minimum is at c_m = mean F^m − Δ, where its value is the sum of the heads' "
    "in-stage (population) variances of F^m."
    g = torch.Generator().manual_seed(4)
    tasks = [[0, 5], [1, 2, 3], [4, 6, 7, 8, 9]]
    m = _mec_over(tasks, delta=-5.0)
    u, y = 3 * torch.randn(40, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (40,), generator=g)
    F_in = [torch.tensor([-math.log(sum(math.exp(float(u[i, c])) for c in t))
                          for i in range(40) if int(y[i]) in t], dtype=torch.float64) for t in tasks]
    c = torch.tensor([float(f.mean()) + 5.0 for f in F_in], dtype=torch.float64, requires_grad=True)
    classes = torch.cat([torch.tensor(t) for t in tasks])
    shift = torch.zeros(10, dtype=torch.float64).index_add(0, classes, torch.cat([c[k].expand(len(t))
                                                                                  for k, t in enumerate(tasks)]))
    loss = m.anchor_loss(u + shift, y)
    (grad,) = torch.autograd.grad(loss, c)
    assert math.isclose(float(loss.detach()), sum(float(f.var(unbiased=False)) for f in F_in), rel_tol=1e-10)
    assert float(grad.abs().max()) < 1e-10


def test_mec_loss_weighs_its_terms_by_gamma_lambda1_lambda2():
    "Eq. 11 with γ, λ1, λ2 and T away from their defaults: the loss is γ·CE + λ1·(L_M + L_R) + λ2·(L_al + Σ "
    "L_kd), each term its formula (CE over every head's logits, the anchor and KD written out above, MERL's "
    "KL and norm)."
    ds = load_dataset("digits")
    am = Amalgamation.split(ds, 2, seed=0)
    ex = _experts(am)
    torch.manual_seed(3)
    method = MEC(T=2.0, gamma=0.7, lam1=0.3, lam2=0.4, delta=-2.0)
    d = Distiller(create_model("cnn_small", 10, 1), method, ds, teachers=ex,
                  cfg=TrainConfig(epochs=1, batch_size=16), progress=False, tasks=am.tasks)
    d.setup()
    x, y, _ = next(iter(d.train_dl))
    s, t = d.student(x), d.bank(x, feats=True)
    out = method.loss((x, y), s, t)
    u = (s.pooled @ method.heads.weight.T + method.heads.bias).double().detach()
    tasks = [tk.tolist() for tk in am.tasks]
    ce = float(-(u.log_softmax(1)[torch.arange(len(y)), y]).mean())
    anchor = _anchor_by_hand(u, y, tasks, -2.0)
    kd = _head_kd_by_hand(u, [v.double() for v in t.logits], tasks, 2.0)
    fts = [f[-1] for f in t.feats]
    size = s.feats[-1].shape[-2:]
    fts = [f if f.shape[-2:] == size else F.adaptive_avg_pool2d(f, size) for f in fts]
    with torch.no_grad(): hs, hts, recs = method.common(s.feats[-1], fts)
    pg = hs.double().softmax(1)
    merl_m = sum(float((pg * (pg.log() - h.double().softmax(1).log())).sum(1).mean()) for h in hts)  # Eq. 4-5
    merl_r = sum(float((r.double() - f.double()).flatten(1).pow(2).sum(1).sqrt().mean())            # Eq. 6
                 for r, f in zip(recs, fts))
    for k, v in (("ce", ce), ("anchor", anchor), ("kd", kd), ("merl_m", merl_m), ("merl_r", merl_r)):
        assert math.isclose(float(out[k].detach()), v, rel_tol=2e-5), k
    want = 0.7 * ce + 0.3 * (merl_m + merl_r) + 0.4 * (anchor + kd)
    assert math.isclose(float(out["loss"].detach()), want, rel_tol=2e-5)
