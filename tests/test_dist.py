"""Training under DDP (chapter 06) on the CPU with gloo: the rules and their errors, each rank's share of the data, two
processes against one (the student's weights after a few steps), what the methods synchronise, resume on every rank, and
`kdbook run` under torchrun."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

import kdbook.dist as kd
from kdbook.ddp_checks import equivalence_run
from kdbook.data import ImageDataset, Split, load_dataset, make_loaders

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def importable_workers(monkeypatch):
    "The processes `spawn` starts import this file's workers by name (`test_dist`)."
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))


def gap(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------------------------------------ rules and errors
def test_batch_and_learning_rate_rules():
    assert kd.per_rank_batch(128, 4) == 32 and kd.lr_scale(4) == 1.0
    assert kd.per_rank_batch(128, 4, "linear") == 128 and kd.lr_scale(4, "linear") == 4.0
    with pytest.raises(ValueError, match="per-rank batch of 0"): kd.per_rank_batch(3, 4)
    with pytest.raises(ValueError, match="does not split evenly across 4 processes.*e.g. 128 or 132"): kd.per_rank_batch(130, 4)
    with pytest.raises(ValueError, match="lr_rule must be one of 'global', 'linear', got 'sqrt'"): kd.lr_scale(2, "sqrt")


def test_launcher_and_backend_errors():
    assert kd.launcher_env({}) is None
    with pytest.raises(ValueError, match="need 0 <= RANK < WORLD_SIZE"): kd.launcher_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK='a' in the environment is not an integer"): kd.launcher_env({"RANK": "a", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'gloo', 'nccl', got 'mpi'"): kd.resolve_backend("mpi", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'nccl' needs CUDA GPUs"): kd.resolve_backend("nccl", "auto")
    with pytest.raises(ValueError, match="SyncBatchNorm runs on GPUs only"): kd.init_distributed("gloo", "cpu", sync_bn=True)
    with pytest.raises(ValueError, match="op must be one of"): kd.all_reduce(torch.ones(1), "avg")
    def f(): pass
    f.__module__ = "__main__"   # as a function defined in a notebook or a script
    with pytest.raises(ValueError, match="not one defined in __main__"): kd.spawn(f, 2)
    assert kd.init_distributed() == kd.Dist() and kd.current().world_size == 1   # no launcher: one process


# ------------------------------------------------------------------------------------------------ the data
def augmented_data(n=200) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=g), torch.randint(0, 4, (n,), generator=g))
    return ImageDataset("random", split, Split(split.x[:37], split.y[:37]), list("abcd"), (0.5,), (0.25,), pad=2, flip=True,
                        source="test")


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_share_each_global_batch(world):
    "Each step, the ranks' slices (with their crops and flips) put together are one process's batch; the test split once."
    data = augmented_data()
    one, _ = make_loaders(data, 32, seed=5)
    ranks = [make_loaders(data, 32 // world, seed=5, rank=r, world_size=world) for r in range(world)]
    for dl in [one, *(tr for tr, _ in ranks)]: dl.set_epoch(3)
    steps = list(zip(one, *(tr for tr, _ in ranks)))
    assert len(steps) == len(one) == 200 // 32
    for full, *parts in steps:
        for k in range(3): assert torch.equal(torch.cat([p[k] for p in parts]), full[k])
    test = torch.cat([i for _, te in ranks for _, _, i in te])
    assert torch.equal(test, torch.arange(37))
    with pytest.raises(ValueError, match=r"batch_size 400 \(2 ranks × 200 per rank\) > 200 samples"):
        make_loaders(data, 200, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"): make_loaders(data, 8, rank=2, world_size=2)


# ------------------------------------------------------------------------------------------------ 2 processes vs 1
@pytest.mark.parametrize("method,settings", [("aver", {}), ("aekd", {"C": 1.0}), ("aekd", {"C": 1.0, "gram": "mean"})])
def test_two_processes_train_the_same_student_as_one(method, settings):
    "Without augmentation, 2 ranks at batch 32 each end 5 steps with the weights of 1 process at batch 64 (float32 rounding)."
    alone = equivalence_run(method, settings=settings)
    two = kd.spawn(equivalence_run, 2, (method, 1, 64, 320, 0, settings))
    assert gap(two[0]["state"], two[1]["state"]) == 0
    assert gap(alone["state"], two[0]["state"]) < 1e-5
    assert abs(alone["history"][-1]["train_loss"] - two[0]["history"][-1]["train_loss"]) < 1e-5   # the mean over ranks
    assert alone["history"][-1]["test_top1"] == two[1]["history"][-1]["test_top1"]                 # counts, all-reduced


def aekd_weights_worker(sync: bool) -> torch.Tensor:
    "AE-KD's weights on this rank's half of a fixed batch, with and without the Gram all-reduce."
    from kdbook.aekd import aekd_weights
    torch.manual_seed(1)
    s, t = torch.randn(16, 10, dtype=torch.float64), 3 * torch.randn(3, 16, 10, dtype=torch.float64)
    r = kd.current().rank
    return aekd_weights(s[8 * r:8 * r + 8], t[:, 8 * r:8 * r + 8], C=1.0, sync=sync)


def test_aekd_ranks_solve_the_global_qp():
    "With the Gram all-reduced every rank takes the whole batch's weights; without, each takes its own half's."
    from kdbook.aekd import aekd_weights
    torch.manual_seed(1)
    s, t = torch.randn(16, 10, dtype=torch.float64), 3 * torch.randn(3, 16, 10, dtype=torch.float64)
    whole = aekd_weights(s, t, C=1.0)
    synced = kd.spawn(aekd_weights_worker, 2, (True,))
    alone = kd.spawn(aekd_weights_worker, 2, (False,))
    assert all(torch.allclose(w, whole, atol=1e-9) for w in synced)
    assert float((alone[0] - alone[1]).abs().max()) > 1e-2


def test_method_parameters_stay_equal_across_ranks():
    "FitNet-MKD's regressors sit outside DDP: their gradients are averaged, so their weights agree on every rank; their "
    "BatchNorm statistics (each rank's own while training) are rank 0's after the evaluation that ends each epoch."
    two = kd.spawn(equivalence_run, 2, ("fitnet", 1, 64, 320, 0, {}))
    a, b = two[0]["method"], two[1]["method"]
    params = [k for k in a if "running" not in k and a[k].is_floating_point()]
    assert params and any("running_mean" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert gap(two[0]["state"], two[1]["state"]) == 0


def test_mmkd_meta_nets_take_the_same_step_on_every_rank():
    "Each rank's hypergradient comes from its own hard buffer; averaged, every rank's meta-nets and Adam moments agree."
    settings = {"period": 2, "buffer_size": 64, "beta": 0.0}
    two = kd.spawn(equivalence_run, 2, ("mmkd", 1, 64, 320, 0, settings))
    a, b = two[0]["method"], two[1]["method"]
    nets = [k for k in a if k.startswith("nets.") and a[k].is_floating_point()]
    assert nets and all(torch.equal(a[k], b[k]) for k in nets)
    assert gap(two[0]["state"], two[1]["state"]) == 0


def batch_terms(rank_share: bool) -> dict:
    "Gradients of CFL's MMD (through `all_gather_cat`) and MEC's anchor term (counts all-reduced) on a fixed batch of 12, "
    "with respect to a weight that makes the features; on 2 ranks each takes its half, and the gradients are averaged as DDP does."
    from types import SimpleNamespace
    from kdbook.cfl import mmd
    from kdbook.mec import MEC, head_layout
    torch.manual_seed(3)
    x, t, y = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3] * 3)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    d = kd.current()
    sl = slice(6 * d.rank, 6 * d.rank + 6) if rank_share else slice(None)
    h = x[sl] @ w
    m_mmd = mmd(kd.all_gather_cat(h, 0), kd.all_gather_cat(t[sl], 0))
    tasks = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    index, valid = head_layout(tasks)
    mec = SimpleNamespace(_tasks=tasks, _index=index, _valid=valid, _task_of=torch.tensor([0, 0, 1, 1]), delta=1.0)
    anchor = MEC.anchor_loss(mec, h, y[sl])
    out = {}
    for name, loss in (("mmd", m_mmd), ("anchor", anchor)):
        (g,) = torch.autograd.grad(loss, w, retain_graph=True)
        out[name] = kd.all_reduce(g.clone(), "mean")   # what DDP does with the ranks' gradients
    return out


def test_batch_level_terms_match_one_process():
    "CFL's MMD over gathered features and MEC's anchor with global counts: 2 ranks' averaged gradients equal one process's."
    alone = batch_terms(False)
    for r in kd.spawn(batch_terms, 2, (True,)):
        for k in alone: assert torch.allclose(r[k], alone[k], atol=1e-12), k


# ------------------------------------------------------------------------------------------------ resume
def train_worker(out: str, epochs: int, method: str, stop_after: int | None = None) -> dict:
    "Train on digits with checkpoints in `out`, resuming from them (and stopping, as if killed, after epoch `stop_after`); this rank's student and method state."
    import kdbook.mmkd  # noqa: F401 -- registers mmkd
    from kdbook.learner import Callback, Distiller, TrainConfig, make_method
    class Stop(Callback):
        order = 20   # after the checkpoint
        def after_epoch(self, learn):
            if learn.epoch + 1 == stop_after: raise InterruptedError
    from kdbook.models import create_model
    data = load_dataset("digits")
    torch.manual_seed(1000)
    teachers = [create_model("mlp", 10, 1).eval() for _ in range(2)]
    torch.manual_seed(0)
    m = make_method(method, **({"period": 3, "buffer_size": 64, "beta": 0.0} if method == "mmkd" else {}))
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, device="cpu", augment=False)
    d = Distiller(create_model("mlp", 10, 1), m, data, teachers=teachers, cfg=cfg, out_dir=out, resume=True, progress=False,
                  callbacks=[Stop()])
    try: d.fit()
    except InterruptedError: pass
    return {"state": d.student.state_dict(), "method": d.method.state_dict(), "history": d.history}


def test_resume_restores_every_rank(tmp_path):
    "Two ranks stopped after epoch 1 and resumed end as the uninterrupted run, rank 1's own MMKD hard buffer included; "
    "a checkpoint of 2 ranks refuses a 1-process resume, naming both."
    whole = kd.spawn(train_worker, 2, (str(tmp_path / "whole"), 2, "mmkd"))
    kd.spawn(train_worker, 2, (str(tmp_path / "cut"), 2, "mmkd", 1))
    assert (tmp_path / "cut" / "checkpoints" / "epoch-0001" / "rank-1.safetensors").exists()
    resumed = kd.spawn(train_worker, 2, (str(tmp_path / "cut"), 2, "mmkd"))
    for r in range(2):
        assert gap(whole[r]["state"], resumed[r]["state"]) == 0
        assert gap(whole[r]["method"], resumed[r]["method"]) == 0
    assert not torch.equal(whole[0]["method"]["buffer.x"], whole[1]["method"]["buffer.x"])   # the ranks' buffers differ
    assert [h["test_top1"] for h in whole[0]["history"]] == [h["test_top1"] for h in resumed[1]["history"]]
    with pytest.raises(ValueError, match=r"written by 2 process\(es\).*this run has 1"):
        train_worker(str(tmp_path / "cut"), 2, "mmkd")


# ------------------------------------------------------------------------------------------------ the command
def torchrun(*args, env, n=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "kdbook.cli", *args], capture_output=True, text=True, env=env, timeout=900)


def test_kdbook_run_under_torchrun(tmp_path):
    "`torchrun --nproc_per_node=2 -m kdbook.cli run` on digits: one results file (world_size 2) and one report, written "
    "by rank 0; its accuracies within noise of the same study in one process."
    env = {**os.environ, "KDBOOK_CACHE": str(tmp_path / "cache")}
    flags = ["--data", "digits", "--methods", "aver,aekd", "--seeds", "2", "--epochs", "3", "--teacher-epochs", "3", "--threads", "1"]
    p = torchrun("run", *flags, "--out", str(tmp_path / "two"), env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("method            top-1") == 1                     # rank 0 alone prints the table
    assert [f.relative_to(tmp_path) for f in tmp_path.rglob("results.json")] == [Path("two/results.json")]
    assert (tmp_path / "two" / "report.html").exists()
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert {k: two["config"][k] for k in ("world_size", "backend", "lr_rule")} == {"world_size": 2, "backend": "gloo", "lr_rule": "global"}
    one = subprocess.run([sys.executable, "-m", "kdbook.cli", "run", *flags, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert one["config"]["world_size"] == 1
    for a, b in zip(one["summary"], two["summary"]):
        assert a["method"] == b["method"] and abs(a["mean"] - b["mean"]) < 3 + 3 * max(a["std"], b["std"]), (a, b)


def test_kdbook_run_bad_distributed_input(tmp_path):
    env = {**os.environ, "KDBOOK_CACHE": str(tmp_path / "cache")}
    p = torchrun("run", "--data", "digits", "--batch-size", "1", "--epochs", "1", "--out", str(tmp_path / "o"), env=env)
    assert p.returncode != 0 and "batch size 1 split across 2 processes leaves a per-rank batch of 0" in p.stderr
    p = subprocess.run([sys.executable, "-m", "kdbook.cli", "run", "--sync-bn", "--device", "cpu", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "SyncBatchNorm runs on GPUs only" in p.stderr
    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, "-m", "kdbook.cli", "run", "--backend", "nccl", "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 2 and "backend 'nccl' needs CUDA GPUs" in p.stderr


# ------------------------------------------------------------------------------------------------ the gather's backward
def sibling_branch_grads(rank_share: bool) -> dict:
    "Gradients of ((all_gather_cat(x @ w) + b)²).sum() with b = exp(b0) built before the gather (autograd "
    "reaches b's branch after the gather's backward, with the same incoming gradient tensor); averaged over "
    "the ranks as DDP does."
    torch.manual_seed(4)
    x = torch.randn(8, 3, dtype=torch.float64)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)   # the gathered shape: no broadcast sum
    b = b0.exp()
    d = kd.current()
    sl = slice(4 * d.rank, 4 * d.rank + 4) if rank_share else slice(None)
    loss = ((kd.all_gather_cat(x[sl] @ w, 0) + b) ** 2).sum()
    gw, gb = torch.autograd.grad(loss, (w, b0))
    return {"w": kd.all_reduce(gw.clone(), "mean"), "b0": kd.all_reduce(gb.clone(), "mean")}


def test_gather_leaves_a_sibling_branchs_gradient_alone():
    "The gather's backward sums the ranks' gradients into a new tensor: a branch sharing its incoming "
    "gradient still sees one rank's copy, so d/db0 (and d/dw) on 2 ranks equal the one-process values, "
    "checked by hand in float64."
    alone = sibling_branch_grads(False)
    torch.manual_seed(4)
    x, w, b0 = (torch.randn(*sh, dtype=torch.float64) for sh in ((8, 3), (3, 2), (8, 2)))
    r = x @ w + b0.exp()
    assert torch.allclose(alone["w"], 2 * x.T @ r, atol=1e-12)
    assert torch.allclose(alone["b0"], 2 * r * b0.exp(), atol=1e-12)
    for g in kd.spawn(sibling_branch_grads, 2, (True,)):
        for k in alone: assert torch.allclose(g[k], alone[k], atol=1e-12), (k, g[k], alone[k])


# ------------------------------------------------------------------------------------------------ the other synchronised sums
def synced_statistics(rank_share: bool, sync: bool = True) -> dict:
    "MoE-KD's per-batch prototypes (Eq. 7's two sums all-reduced), AE-KD's Gram of the batch-mean gradients "
    "(the means averaged) and AE-KD*'s hint weights in both forms, on a fixed batch of 12: on 2 ranks each "
    "takes its half."
    from kdbook.aekd import aekd_weights, hint_weights
    from kdbook.moekd import class_prototypes
    g = torch.Generator().manual_seed(6)
    probs = torch.softmax(2 * torch.randn(12, 4, generator=g, dtype=torch.float64), -1)
    feats = torch.randn(12, 3, generator=g, dtype=torch.float64)
    s = torch.randn(12, 5, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(3, 12, 5, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64).view(3, 1, 1, 1)
    grads = torch.randn(3, 12, 2, 2, generator=g, dtype=torch.float64) * scales
    d = kd.current()
    sl = slice(6 * d.rank, 6 * d.rank + 6) if rank_share else slice(None)
    sync = sync and rank_share
    return {"prototypes": class_prototypes(probs[sl], feats[sl], sync=sync),
            "aekd_mean": aekd_weights(s[sl], t[:, sl], T=2.0, C=0.5, gram="mean", sync=sync),
            "hint_paper": hint_weights(grads[:, sl], 0.5, "paper", sync=sync),
            "hint_code": hint_weights(grads[:, sl], 0.5, "code", sync=sync)}


def test_synchronised_statistics_equal_one_process():
    "Each synchronised quantity on 2 ranks equals one process's on the whole batch; without the sync the "
    "halves' differ."
    alone = synced_statistics(False)
    for r in kd.spawn(synced_statistics, 2, (True,)):
        for k in alone: assert torch.allclose(r[k], alone[k], atol=1e-9), (k, r[k], alone[k])
    for r in kd.spawn(synced_statistics, 2, (True, False)):
        for k in alone: assert float((r[k] - alone[k]).abs().max()) > 1e-3, k
