"""The Distiller: resume after a real SIGKILL, NaN stop, config validation, teacher cache."""
import json, signal, subprocess, sys, textwrap

import pytest
import torch
from safetensors.torch import load_file

from kdbook.data import load_dataset
from kdbook.learner import Distiller, Method, NonFiniteLossError, TrainConfig, atomic_write_text, learning_rate
from kdbook.study import train_teachers
from kdbook.models import create_model

SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from safetensors.torch import save_file
    from kdbook.data import load_dataset
    from kdbook.learner import Distiller, TrainConfig, Callback
    from kdbook.models import create_model
    out, kill_at = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    class Kill(Callback):
        def after_step(self, learn):
            if learn.global_step == kill_at: os.kill(os.getpid(), signal.SIGKILL)
    torch.manual_seed(0)
    ds = load_dataset("digits")
    d = Distiller(create_model("mlp", 10, 1), data=ds, cfg=TrainConfig(epochs=4, seed=0, schedule="cosine"),
                  out_dir=out, resume=True, progress=False, callbacks=[Kill()] if kill_at >= 0 else [])
    d.fit()
    save_file({k: v.contiguous() for k, v in d.student.state_dict().items()}, os.path.join(out, "final.safetensors"))
""")


def _run(out, kill_at):
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(kill_at)], capture_output=True, text=True)


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    ref = _run(tmp_path / "ref", -1)
    assert ref.returncode == 0, ref.stderr
    killed = _run(tmp_path / "run", 22 * 2 + 7)          # in the middle of the third epoch
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "epoch-0002"
    assert not (tmp_path / "run" / "final.safetensors").exists()
    resumed = _run(tmp_path / "run", -1)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "ref" / "final.safetensors"), load_file(tmp_path / "run" / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2, 3]


class _NaNAt(Method):
    name = "nan-at"
    def __init__(self, at):
        super().__init__(); self.at, self.n = at, 0
    def loss(self, batch, s, t):
        self.n += 1
        loss = super().loss(batch, s, t)["loss"]
        return {"loss": loss * (float("inf") if self.n == self.at else 1.0)}


def test_nonfinite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    ds = load_dataset("digits")
    d = Distiller(create_model("mlp", 10, 1), _NaNAt(50), ds, cfg=TrainConfig(epochs=4), out_dir=tmp_path, progress=False)
    spe = d.steps_per_epoch
    with pytest.raises(NonFiniteLossError) as e:
        d.fit()
    msg = str(e.value)
    assert f"epoch {49 // spe + 1}, step {49 % spe + 1} (global step 50)" in msg
    assert f"epoch-{49 // spe:04d}" in msg
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"epoch-{49 // spe:04d}"


@pytest.mark.parametrize("kw,msg", [
    (dict(epochs=-1), "TrainConfig.epochs must be an integer >= 1, got -1"),
    (dict(batch_size=2.5), "TrainConfig.batch_size must be an integer >= 1, got 2.5"),
    (dict(optimizer="rmsprop"), "TrainConfig.optimizer must be one of ('sgd', 'adam'), got 'rmsprop'"),
    (dict(schedule="poly"), "TrainConfig.schedule must be one of ('multistep', 'cosine', 'constant'), got 'poly'"),
    (dict(lr=-0.1), "TrainConfig.lr must be a finite number >= 0, got -0.1"),
    (dict(weight_decay=float("inf")), "TrainConfig.weight_decay must be a finite number >= 0, got inf"),
    (dict(momentum=1.5), "TrainConfig.momentum must be in [0, 1), got 1.5"),
    (dict(milestones=(0.5, 1.5)), "TrainConfig.milestones must be increasing fractions of the run"),
    (dict(seed=-3), "TrainConfig.seed must be an integer >= 0, got -3"),
    (dict(device="tpu"), "TrainConfig.device must be"),
])
def test_bad_config_values_get_clear_errors(kw, msg):
    with pytest.raises(ValueError) as e:
        TrainConfig(**kw)
    assert msg in str(e.value)


def test_distiller_argument_errors(tmp_path):
    ds = load_dataset("digits")
    net = create_model("mlp", 10, 1)
    with pytest.raises(ValueError, match="batch_size 5000 is larger than the training split"):
        Distiller(net, data=ds, cfg=TrainConfig(batch_size=5000))
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        Distiller(net, data=ds, resume=True)
    with pytest.raises(ValueError, match="method must be a kdbook.learner.Method"):
        Distiller(net, method="aver", data=ds)
    class NeedsT(Method): needs_teachers = True
    with pytest.raises(ValueError, match="distils from teachers, but teachers=None"):
        Distiller(net, NeedsT(), ds)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Distiller(net, data=ds, cfg=TrainConfig(device="cuda"))


def test_multistep_schedule_matches_the_papers_epochs():
    c = TrainConfig(epochs=240)
    lrs = [learning_rate(c, e) for e in range(240)]
    changes = [e for e in range(1, 240) if lrs[e] != lrs[e - 1]]
    assert changes == [150, 180, 210]


def test_teacher_cache_is_content_addressed(tmp_path):
    ds = load_dataset("digits").subset(300, 100, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=32)
    a = train_teachers("mlp", ds, seeds=[0], cfg=cfg, cache=tmp_path, progress=False, verbose=False)[0]
    b = train_teachers("mlp", ds, seeds=[0], cfg=cfg, cache=tmp_path, progress=False, verbose=False)[0]
    c = train_teachers("mlp", ds, seeds=[0], cfg=TrainConfig(epochs=2, batch_size=32), cache=tmp_path, progress=False, verbose=False)[0]
    assert (a.info["cached"], b.info["cached"], c.info["cached"]) == (False, True, False)
    assert a.info["key"] == b.info["key"] != c.info["key"]
    info = json.loads((tmp_path / a.info["key"] / "info.json").read_text())
    assert info["arch"] == "mlp" and 0 <= info["test_top1"] <= 100 and info["config"]["epochs"] == 1
    assert sorted(p.name for p in (tmp_path / a.info["key"]).iterdir()) == ["info.json", "weights.safetensors"]


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    p = atomic_write_text(tmp_path / "x.json", "1")
    atomic_write_text(p, "2")
    assert p.read_text() == "2" and [f.name for f in tmp_path.iterdir()] == ["x.json"]


# ---- the method registry and the study runner ----
from kdbook.learner import make_method, register_method
from kdbook.study import StudyResult, run_study
import kdbook.learner as learner


def test_registry_rejects_a_taken_name_naming_both_classes(monkeypatch):
    monkeypatch.setattr(learner, "METHODS", dict(learner.registered_methods()))
    class First(Method): name = "dup_name"
    class Second(Method): name = "dup_name"
    register_method(First)
    with pytest.raises(ValueError, match=r"method name 'dup_name' is taken by .*First; give .*Second another name"):
        register_method(Second)
    with pytest.raises(TypeError, match="takes a kdbook.learner.Method subclass"):
        register_method(int)


def test_a_user_method_runs_through_the_runner_like_a_builtin(monkeypatch):
    monkeypatch.setattr(learner, "METHODS", dict(learner.registered_methods()))
    @register_method
    class Halved(Method):
        "Cross-entropy scaled by `scale`: a method defined in user code."
        name = "halved"
        def __init__(self, scale: float = 0.5): super().__init__(); self.scale = scale
        def loss(self, batch, s, t): return {"loss": self.scale * torch.nn.functional.cross_entropy(s.logits, batch[1])}
    ds = load_dataset("digits").subset(400, 100, seed=0)
    res = run_study(ds, None, "mlp_tiny", ["halved"], seeds=[0], cfg=TrainConfig(epochs=1, batch_size=32),
                    settings={"halved": {"scale": 0.25}})
    assert isinstance(res, StudyResult) and list(res.runs) == ["ce/0", "halved/0"]
    assert res.runs["halved/0"]["status"] == "ok" and res.runs["halved/0"]["hparams"] == {"scale": 0.25}
    assert isinstance(res.methods["halved/0"], Halved) and res.methods["halved/0"].scale == 0.25
    assert [r["method"] for r in res.summary()] == ["ce", "halved"]


def test_a_methods_record_is_kept_in_results_json_and_survives_reuse(tmp_path):
    "Method.record() lands in the run's entry of results.json; a reused run keeps it (AE-KD's teacher weights use this)."
    class Counted(Method):
        name = "counted"
        def __init__(self): super().__init__(); self.steps = 0
        def after_step(self, learner): self.steps += 1
        def record(self): return {"steps": self.steps}
    ds = load_dataset("digits").subset(320, 100, seed=0)
    kw = dict(seeds=[0], cfg=TrainConfig(epochs=1, batch_size=32), baseline=False, out=tmp_path / "out")
    first = run_study(ds, None, "mlp_tiny", {"counted": Counted}, **kw)
    assert first.runs["counted/0"]["record"] == {"steps": 10}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"]["counted/0"]["record"] == {"steps": 10}
    again = run_study(ds, None, "mlp_tiny", {"counted": Counted}, **kw)
    assert again.runs["counted/0"]["reused"] and again.runs["counted/0"]["record"] == {"steps": 10}
    assert run_study(ds, None, "mlp_tiny", {"ce": Method}, **kw | {"out": None}).runs["ce/0"]["record"] == {}


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    ds = load_dataset("digits").subset(300, 100, seed=0)
    teachers = train_teachers(["mlp", "mlp"], ds, seeds=[0, 1], cfg=TrainConfig(epochs=1, batch_size=32),
                              cache=tmp_path_factory.mktemp("teachers"), progress=False, verbose=False)
    import kdbook.baselines  # noqa: F401  (registers aver)
    return ds, teachers


@pytest.mark.parametrize("change", ["nothing", "epochs", "lr", "method setting", "teachers", "fresh"])
def test_a_finished_run_is_reused_only_when_every_setting_matches(change, small_study, tmp_path, monkeypatch):
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    ds, teachers = small_study
    base = dict(cfg=TrainConfig(epochs=1, batch_size=32), settings={"aver": {"T": 4.0}}, seeds=[0], out=tmp_path / "out")
    first = run_study(ds, teachers, "mlp_tiny", ["aver"], **base)
    assert [r["reused"] for r in first.runs.values()] == [False, False]
    kw = dict(base)
    if change == "epochs": kw["cfg"] = TrainConfig(epochs=2, batch_size=32)
    if change == "lr": kw["cfg"] = TrainConfig(epochs=1, batch_size=32, lr=0.1)
    if change == "method setting": kw["settings"] = {"aver": {"T": 2.0}}
    if change == "teachers": teachers = teachers[:1]
    if change == "fresh": kw["fresh"] = True
    lines, ckpt = [], next((tmp_path / "out" / "runs" / "aver").glob("seed0-*")) / "checkpoints" / "epoch-0001"
    (ckpt / "marker").write_text("")   # gone if the run trains again from scratch (an inode number can be reused)
    again = run_study(ds, teachers, "mlp_tiny", ["aver"], log=lines.append, **kw)
    reused = {k: r["reused"] for k, r in again.runs.items()}
    if change == "nothing":
        assert reused == {"ce/0": True, "aver/0": True}
        assert again.runs["aver/0"]["seconds"] == first.runs["aver/0"]["seconds"]   # the original time, not 0
    elif change in ("method setting", "teachers"):   # the student alone does not depend on them
        assert reused == {"ce/0": True, "aver/0": False}
        assert any("settings changed" in l for l in lines), lines
    else:
        assert reused == {"ce/0": False, "aver/0": False}
    if change == "fresh": assert ckpt.exists() and not (ckpt / "marker").exists()   # trained again, not resumed from the old checkpoint
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["runs"]["aver/0"]["key"] == again.runs["aver/0"]["key"]


def test_prepare_runs_once_after_setup_and_before_restore_and_teacher_outputs_false_skips_the_bank(tmp_path):
    "`Method.prepare` sees the set-up method and the data once; a resume's restore then overwrites what it computed; `teacher_outputs = False` runs no teacher in a step."
    calls = []
    class Stat(Method):
        name = "stat-probe"
        needs_teachers, teacher_outputs = True, False
        def setup(self, student, bank, batch): self.register_buffer("n", torch.zeros(()))
        def prepare(self, learner):
            calls.append(("prepare", float(self.n), len(learner.data.train)))
            self.n.fill_(-1.0)              # what a restore must replace
        def loss(self, batch, s, t):
            assert t is None                # the bank was not run
            self.n += 1
            return super().loss(batch, s, t)
    ds = load_dataset("digits").subset(256, 64, seed=0)
    teacher = create_model("mlp_tiny", 10, 1)
    cfg = TrainConfig(epochs=1, batch_size=64)
    d = Distiller(create_model("mlp_tiny", 10, 1), Stat(), ds, teachers=[teacher], cfg=cfg, out_dir=tmp_path, progress=False)
    d.fit()
    assert calls == [("prepare", 0.0, 256)] and float(d.method.n) == -1.0 + 4     # 4 steps after prepare
    d2 = Distiller(create_model("mlp_tiny", 10, 1), Stat(), ds, teachers=[teacher], cfg=cfg, out_dir=tmp_path, resume=True,
                   progress=False)
    d2.setup()
    assert len(calls) == 2 and float(d2.method.n) == 3.0                          # the checkpoint's value, not prepare's


def test_a_chapter_notebook_and_the_package_can_both_register_their_copy_of_a_method(monkeypatch):
    "Running a chapter's notebook defines its classes in `__main__`; importing the package (e.g. through kdbook.cli) must not clash with them."
    monkeypatch.setattr(learner, "METHODS", dict(learner.registered_methods()))
    from kdbook.baselines import AVER
    notebook_copy = type("AVER", (Method,), {"name": "aver", "__module__": "__main__", "__qualname__": AVER.__qualname__})
    register_method(notebook_copy)
    assert learner.METHODS["aver"] is notebook_copy
    register_method(AVER)                                   # the package's class, imported after the notebook ran
    assert learner.METHODS["aver"] is AVER
    other = type("Other", (Method,), {"name": "aver", "__module__": "__main__"})
    with pytest.raises(ValueError, match="method name 'aver' is taken by kdbook.baselines.AVER"): register_method(other)
