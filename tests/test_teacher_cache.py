"""The teacher cache (chapter 09): exact logits by (image, view), the same training as live teachers, a build that
survives kill -9, one builder at a time, float16's rounding bound, the plan, and `kdbook run --teacher-cache`."""
import copy, dataclasses, json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from kdbook.data import crop_flip, load_dataset, make_loaders, view_index
from kdbook.learner import Distiller, TrainConfig, make_method
from kdbook.models import TeacherBank, create_model
from kdbook.teacher_cache import (TeacherLogitCache, build_teacher_cache, cache_bytes, file_lock, n_views,
                                  plan_teacher_cache, slot_offsets)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def aug():
    "400 digits with a pad-1 crop and a flip: 18 views of each training image."
    return dataclasses.replace(load_dataset("digits").subset(400, 200), pad=1, flip=True)


def make_teachers(n_classes=(10, 10)):
    "Untrained but fixed teachers (seeded), with BatchNorm in `cnn_small` given non-trivial statistics."
    torch.manual_seed(0)
    out = []
    for arch, c in zip(("mlp", "cnn_small"), n_classes):
        t = create_model(arch, c, 1)
        for m in t.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
        out.append(t.eval())
    return out


def reference_logits(teachers, data, idx, views, pad):
    "Float64, unfolded teachers on crops made here from the stored images (no loader, no bank)."
    side = 2 * pad + 1
    dy, dx, fl = (views // 2) // side, (views // 2) % side, (views % 2).bool()
    x = crop_flip(data.train.x[idx], dy, dx, fl, pad).double() / 255
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (data.mean, data.std))
    x = (x - mean) / std
    with torch.no_grad():
        return [copy.deepcopy(t).double()(x).logits for t in teachers]


def test_lookup_against_float64_reference(aug, tmp_path):
    teachers = make_teachers()
    cache = build_teacher_cache(teachers, aug, root=tmp_path)
    assert cache.meta["shape"] == [400, 18, 20]
    g = torch.Generator().manual_seed(1)
    idx, views = torch.randint(0, 400, (300,), generator=g), torch.randint(0, 18, (300,), generator=g)
    got, ref = cache.lookup(idx, views), reference_logits(teachers, aug, idx, views, 1)
    for m in range(2):
        assert (got[m].double() - ref[m]).abs().max() < 1e-5 * ref[m].abs().max()


def test_lookup_is_the_banks_output_on_the_loaders_batches(aug, tmp_path):
    teachers = make_teachers()
    cache, bank = build_teacher_cache(teachers, aug, root=tmp_path), TeacherBank(teachers)
    tl, _ = make_loaders(aug, 64, seed=3, views=True)
    for x, y, idx, views in list(tl)[:6]:
        assert torch.equal(cache.lookup(idx, views), bank(x).logits)


def test_teachers_over_different_classes_give_a_list(aug, tmp_path):
    teachers = make_teachers((10, 6))
    cache, bank = build_teacher_cache(teachers, aug, root=tmp_path), TeacherBank(teachers)
    x, y, idx, views = next(iter(make_loaders(aug, 64, views=True)[0]))
    got, want = cache.lookup(idx, views), bank(x).logits
    assert [g.shape for g in got] == [(64, 10), (64, 6)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("method", ["aver", "ebkd", "kd"])
def test_training_history_is_the_same_with_the_cache(aug, tmp_path, method):
    teachers = make_teachers()
    cache = build_teacher_cache(teachers, aug, root=tmp_path)
    def fit(teacher_logits):
        torch.manual_seed(0)
        d = Distiller(create_model("mlp_tiny", 10, 1), make_method(method), aug, teachers=teachers,
                      cfg=TrainConfig(epochs=3, batch_size=64, lr=0.05), progress=False, teacher_logits=teacher_logits)
        return d.fit(), d.uses_teacher_logits
    (live, used_live), (cached, used) = fit(None), fit(cache)
    assert used and not used_live
    for a, b in zip(live, cached):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6, abs=1e-7)
        assert b["test_top1"] == a["test_top1"]


def test_feature_methods_run_the_teachers(aug, tmp_path):
    cache = build_teacher_cache(make_teachers(), aug, root=tmp_path)
    for name, reads in (("camkd", False), ("fitnet", False), ("aekd_feat", False), ("aekd", True)):
        d = Distiller(create_model("mlp_tiny", 10, 1), make_method(name), aug, teachers=make_teachers(),
                      progress=False, teacher_logits=cache)
        assert d.uses_teacher_logits is reads, name


def test_a_cache_for_other_views_is_refused(aug, tmp_path):
    cache = build_teacher_cache(make_teachers(), aug, root=tmp_path)
    with pytest.raises(ValueError, match="built for other training data or views"):
        Distiller(create_model("mlp_tiny", 10, 1), make_method("aver"), dataclasses.replace(aug, pad=2),
                  teachers=make_teachers(), progress=False, teacher_logits=cache)
    with pytest.raises(TypeError, match="teacher_logits must have lookup"):
        Distiller(create_model("mlp_tiny", 10, 1), make_method("aver"), aug, teachers=make_teachers(),
                  progress=False, teacher_logits=object())


BUILDER = """
import dataclasses, sys, time, torch
sys.path.insert(0, {tests!r})
from test_teacher_cache import make_teachers
from kdbook.data import load_dataset
from kdbook.teacher_cache import build_teacher_cache
aug = dataclasses.replace(load_dataset("digits").subset(400, 200), pad=1, flip=True)
def progress(done, total):
    print("step", done, flush=True)
    if done == 3 and {stall}: time.sleep(120)
build_teacher_cache(make_teachers(), aug, root={root!r}, batch_size=64, progress=progress)
print("built", flush=True)
"""


def start_builder(root, stall: bool):
    code = BUILDER.format(tests=str(ROOT / "tests"), root=str(root), stall=stall)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def test_kill_during_the_build_leaves_no_cache_and_the_next_build_starts_over(aug, tmp_path):
    proc = start_builder(tmp_path, stall=True)
    while proc.stdout.readline().strip() != "step 3": pass
    os.kill(proc.pid, signal.SIGKILL); proc.wait()
    partial = list(tmp_path.glob(".*.tmp-*"))
    assert len(partial) == 1 and (partial[0] / "logits.npy").exists() and not (partial[0] / "meta.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    with pytest.raises(FileNotFoundError, match="no finished teacher cache"):
        TeacherLogitCache(tmp_path / partial[0].name.split(".tmp-")[0].lstrip("."))
    teachers = make_teachers()
    cache = build_teacher_cache(teachers, aug, root=tmp_path)   # the lock is free: the dead builder's is gone
    assert not list(tmp_path.glob(".*.tmp-*"))
    idx, views = torch.arange(400), torch.arange(400) % 18
    got, ref = cache.lookup(idx, views), reference_logits(teachers, aug, idx, views, 1)
    assert all((got[m].double() - ref[m]).abs().max() < 1e-5 * ref[m].abs().max() for m in range(2))


def test_one_builder_at_a_time(aug, tmp_path):
    key = build_teacher_cache(make_teachers(), aug, root=tmp_path / "probe").folder.name
    with file_lock(tmp_path / f"{key}.lock"):
        proc = start_builder(tmp_path, stall=False)
        time.sleep(3)
        assert proc.poll() is None and not (tmp_path / key).exists()   # waiting for the lock
    assert proc.communicate(timeout=120)[0].strip().endswith("built")
    assert (tmp_path / key / "meta.json").exists()


def test_float16_within_its_rounding_bound_and_overflow_refused(aug, tmp_path):
    teachers = make_teachers()
    full = build_teacher_cache(teachers, aug, root=tmp_path).table.double()
    half = build_teacher_cache(teachers, aug, dtype="float16", root=tmp_path).table.double()
    err, bound = (half - full).abs(), torch.maximum(full.abs() * 2.0 ** -11, torch.full_like(full, 2.0 ** -25))
    assert (err <= bound).all() and (err > 0).any()
    loud = make_teachers()
    with torch.no_grad(): loud[0].classifier.weight.mul_(1e6)
    with pytest.raises(ValueError, match="does not fit float16"):
        build_teacher_cache(loud, aug, dtype="float16", root=tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, got 'bfloat16'"):
        build_teacher_cache(teachers, aug, dtype="bfloat16", root=tmp_path)


def test_views_and_sizes_by_hand():
    assert [n_views(0, False), n_views(2, True), n_views(4, True)] == [1, 50, 162]
    dy, dx, fl = slot_offsets(1, True)
    assert view_index(dy, dx, fl, 1).tolist() == list(range(18))
    assert cache_bytes(60_000, 2, True, 10) == 60_000 * 50 * 10 * 4
    assert cache_bytes(50_000, 4, True, 100, "float16") == 50_000 * 162 * 100 * 2


def test_the_plan():
    ms = {m: make_method(m) for m in ("aver", "camkd")}
    # 100 images x 18 views = 1,800 passes; aver alone reads the cache: 1 x 1 seed x epochs x 100 passes live
    assert not plan_teacher_cache("auto", ms, 100, 1, True, 20, 1, 18).use       # 1,800 live: not fewer
    p = plan_teacher_cache("auto", ms, 100, 1, True, 20, 1, 19)
    assert p.use and p.methods == ["aver"] and p.nbytes == 100 * 18 * 20 * 4
    assert plan_teacher_cache("on", ms, 100, 1, True, 20, 1, 1).use
    assert not plan_teacher_cache("off", ms, 100, 1, True, 20, 1, 100).use
    big = plan_teacher_cache("on", ms, 100, 1, True, 20, 1, 100, max_bytes=144_000 - 1)
    assert not big.use and "over the limit" in big.reason and "\n" not in big.reason
    assert not plan_teacher_cache("on", {"camkd": ms["camkd"]}, 100, 1, True, 20, 1, 100).use
    with pytest.raises(ValueError, match="must be auto, on or off, got 'yes'"):
        plan_teacher_cache("yes", ms, 100, 1, True, 20, 1, 1)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_kdbook_run_teacher_cache_flag(tmp_path, monkeypatch, capsys, mode):
    from conftest import quick_run
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    res = quick_run(tmp_path, "digits", "--teacher-cache", mode, methods="aver,camkd")
    read = {r["method"]: r["teacher_cache"] for r in res["runs"].values() if r["method"] != "student"}
    assert read == {"aver": mode == "on", "camkd": False}
    out = capsys.readouterr().out
    assert ("teacher cache: read by aver" in out) == (mode == "on")
    assert ("teacher cache: off" in out) == (mode == "off")
