"The `kdbook` command end to end: bad input, a short study, the report in a real browser, failures kept apart."
import json, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

from kdbook import cli
from kdbook import learner
from kdbook.learner import registered_methods
from conftest import FASHION_MNIST, chromium, require_system

def kdbook(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-c", "import sys; from kdbook.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=900)

@pytest.fixture
def env(tmp_path):
    return {**os.environ, "KDBOOK_CACHE": str(tmp_path / "cache")}

def _root() -> bool: return hasattr(os, "geteuid") and os.geteuid() == 0

def _bad_inputs(tmp):
    "Every bad input `kdbook` has: (arguments, the message's key part)."
    (tmp / "a_file").write_text("x")
    locked = tmp / "locked"; locked.mkdir(); locked.chmod(0o500)
    rows = [
        (["run", "--methods", "aver,foo"], "unknown method 'foo'; valid: ce, aver, kd, ebkd, "),
        (["run", "--methods", ""], "no method given"),
        (["run", "--teachers", "mlp,resnet21"], "unknown model 'resnet21'; valid: resnet8"),
        (["run", "--student", "vgg7"], "unknown model 'vgg7'"),
        (["run", "--data", "mnist"], "invalid choice: 'mnist'"),
        (["run", "--epochs", "0"], "must be an integer >= 1, got '0'"),
        (["run", "--teacher-epochs", "-2"], "must be an integer >= 1, got '-2'"),
        (["run", "--seeds", "two"], "must be an integer >= 1, got 'two'"),
        (["run", "--batch-size", "1.5"], "must be an integer >= 1, got '1.5'"),
        (["run", "--lr", "nan"], "must be a finite number > 0, got 'nan'"),
        (["run", "--threads", "0"], "must be an integer >= 1, got '0'"),
        (["run", "--set", "aekd.D=1"], "method 'aekd' has no parameter 'D'"),
        (["run", "--set", "foo.C=1"], "unknown method 'foo'"),
        (["run", "--set", "aekdC=1"], "expected METHOD.PARAM=VALUE"),
        (["run", "--set", "aekd.C=5", "--methods", "aekd"], "C must be a number in (0, 1]"),
        (["run", "--set", "aekd.C=0.5", "--methods", "aver"], "settings given for method 'aekd', which this study does not run"),
        (["run", "--set", "aver.T=-1", "--methods", "aver"], "temperature T must be a finite number > 0, got -1"),
        (["run", "--set", "aekd.gram=pixel", "--methods", "aekd"], "gram must be one of 'sum', 'mean', 'sample', got 'pixel'"),
        (["run", "--set", "moekd.tau=0", "--methods", "moekd"], "temperature T must be a finite number > 0, got 0"),
        (["run", "--set", "moekd.ablation=no_gate", "--methods", "moekd"], "ablation must be one of 'none', 'uniform_gate'"),
        (["run", "--set", "moekd.teacher=3", "--methods", "moekd"], "teacher=3 but the bank holds 3 teacher(s): valid indices are 0..2"),
        (["run", "--set", "srrl.sr=l1", "--methods", "srrl"], "sr must be one of 'mse', 'kl', got 'l1'"),
        (["run", "--experts", "6"], "n_experts must be an int from 2 to 5 (10 classes, at least 2 per expert), got 6"),
        (["run", "--experts", "2", "--methods", "aver,ka"], "'aver' needs teachers over all the classes; methods that amalgamate: ka, cfl"),
        (["run", "--experts", "0"], "must be an integer >= 1, got '0'"),
        (["run", "--set", "cfl.space=pca", "--methods", "cfl", "--experts", "2"], "space must be one of 'common', 'direct', 'random', got 'pca'"),
        (["run", "--device", "tpu"], "TrainConfig.device must be"),
        (["run", "--out", str(tmp / "a_file")], "is a file, not a folder"),
        (["run", "--out", str(tmp / "a_file" / "sub")], "is a file, not a folder (it is under"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ]
    if not torch.cuda.is_available(): rows.append((["run", "--device", "cuda"], "CUDA is not available"))
    if not _root(): rows.append((["run", "--out", str(locked / "out")], "cannot be written"))
    return rows

def test_every_bad_input_is_one_line_exit_2_and_trains_nothing(tmp_path, monkeypatch, capsys):
    "Table-driven: each bad input gives exit code 2 and one line on stderr, no traceback, nothing trained."
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    for args, msg in _bad_inputs(tmp_path):
        argv = args + ([] if "--out" in args or args[0] != "run" else ["--out", str(tmp_path / "out")])
        try: code = cli.main(argv)             # an unexpected exception would surface here as a traceback
        except SystemExit as e: code = e.code  # argparse's own errors
        out, err = capsys.readouterr()
        assert code == 2, (args, code, err)
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith("usage:") and not l.startswith(" ")]
        assert len(lines) == 1 and msg in lines[0], (args, err)
        assert out == "", (args, out)
    assert not (tmp_path / "cache" / "teachers").exists()   # nothing was trained

def test_ctrl_c_stops_cleanly_and_says_how_to_resume(env, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", "import sys; from kdbook.cli import main; sys.exit(main())", "run",
                          "--epochs", "200", "--teacher-epochs", "2", "--seeds", "1", "--methods", "aver", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # a background job's SIGINT is ignored; the user's is not
    deadline = time.time() + 300
    while not list((out / "runs").glob("student/*/checkpoints/latest")) and time.time() < deadline: time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, stderr)
    assert "Traceback" not in stderr and "run the same command again to resume" in stderr, stderr
    assert list((out / "runs").glob("student/*/checkpoints/epoch-*")), "the interrupted run's checkpoints were kept"

def test_short_study_table_results_and_report(env, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--epochs", "2", "--teacher-epochs", "2", "--seeds", "2", "--methods", "aver,aekd", "--out", str(out)]
    r = kdbook(*args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("method"))
    assert [l.split()[0] for l in lines[header + 1:header + 4]] == ["student", "aver", "aekd"]
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["runs"]) == ["aekd/0", "aekd/1", "aver/0", "aver/1", "student/0", "student/1"]
    assert all(run["status"] == "ok" and 0 < run["top1"] <= 100 for run in res["runs"].values())
    assert [row["method"] for row in res["summary"]] == ["student", "aver", "aekd"]
    # run again: every finished run is reused, nothing is retrained
    r2 = kdbook(*args, env=env)
    assert r2.returncode == 0 and "reused 6 finished runs with the same settings" in r2.stdout, r2.stdout
    assert "replacing" in r2.stdout and "report.html" in r2.stdout
    assert json.loads((out / "results.json").read_text())["summary"] == res["summary"]
    # its size is plotly.js itself, included once so that it opens offline; the rest is a few hundred kB at most
    import plotly
    report = (out / "report.html").read_text()
    js = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").stat().st_size
    assert report.count("plotly.js v") == 1 and len(report.encode()) - js < 300_000, (len(report), js)
    # the figures say what they show (their JSON writes ± as \u00b1 unless plotly finds orjson, which keeps it as is)
    text = report.replace("\\u00b1", "±")
    assert "mean ± std over 2 seeds" in text and "the axis starts at " in text

    browser = chromium()
    require_system(browser is not None, "Chromium (to open report.html)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="main-svg"') >= 2, dom[:2000]   # plotly drew both figures, offline

def test_a_failing_method_is_reported_and_the_others_kept(tmp_path, monkeypatch):
    class Broken(registered_methods()["aver"]):
        name = "broken"
        def loss(self, batch, s, t): raise RuntimeError("this method is broken on purpose")
    monkeypatch.setitem(registered_methods(), "broken", Broken)
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    res = cli.preset_study("digits", methods=["aver", "broken"], epochs=1, teacher_epochs=1, seeds=1,
                           out=tmp_path / "out", log=lambda *a: None)
    assert res["runs"]["aver/0"]["status"] == "ok" and res["runs"]["student/0"]["status"] == "ok"
    assert res["runs"]["broken/0"]["status"] == "failed"
    assert "this method is broken on purpose" in res["runs"]["broken/0"]["error"]
    table = cli.format_table(res["summary"])
    assert "broken" in table and "failed" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"]["aver/0"]["status"] == "ok"

def test_a_method_registered_in_user_code_runs_from_the_command(tmp_path, monkeypatch, capsys):
    "`--methods` comes from the registry: a Method registered by the user is a valid name, `--set` included."
    import torch.nn.functional as F
    from kdbook.learner import Method, register_method
    monkeypatch.setattr(learner, "METHODS", dict(registered_methods()))   # registered for this test only
    @register_method
    class Smoothed(Method):
        name = "smoothed"
        def __init__(self, eps: float = 0.1): super().__init__(); self.eps = eps
        def loss(self, batch, s, t): return {"loss": F.cross_entropy(s.logits, batch[1], label_smoothing=self.eps)}
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    code = cli.main(["run", "--methods", "smoothed", "--set", "smoothed.eps=0.2", "--epochs", "1", "--teacher-epochs", "1",
                     "--seeds", "1", "--out", str(tmp_path / "out")])
    assert code == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["runs"]["smoothed/0"]["status"] == "ok" and res["runs"]["smoothed/0"]["hparams"] == {"eps": 0.2}
    assert "smoothed" in capsys.readouterr().out

def test_data_lists_every_dataset_where_it_is_and_how_to_get_it(tmp_path):
    r = kdbook("data", env={**os.environ, "HOME": str(tmp_path), "KDBOOK_CACHE": str(tmp_path / "c"), "KDBOOK_DATA": ""})
    assert r.returncode == 0
    names = [l.split()[0] for l in r.stdout.splitlines() if not l.startswith(" ")]
    assert names == ["digits", "fashion-mnist", "cifar10", "cifar100"]
    assert "found: scikit-learn" in r.stdout
    assert "load_dataset('cifar100', download=True)" in r.stdout   # a missing dataset says how to get it

def test_fashion_mnist_from_the_debian_copy(env, tmp_path):
    require_system(FASHION_MNIST.exists(), "Debian's dataset-fashion-mnist")
    r = kdbook("run", "--data", "fashion-mnist", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1",
               "--methods", "aekd", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/usr/share/datasets/fashion-mnist" in r.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["runs"]["aekd/0"]["top1"] > 50

def test_cifar100_recipe_command_on_a_small_archive_in_the_real_format(tmp_path):
    "The CIFAR-100 preset is the public AE-KD code's schedule; its command path, and the paper's recipe's, run here on a tiny archive in CIFAR's format."
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import write_cifar
    from kdbook.learner import TrainConfig, learning_rate
    pre = cli.PRESETS["cifar100"]
    assert (pre.teachers, pre.student, pre.epochs, pre.lr, pre.batch_size) == (("resnet56",) * 5, "resnet20", 240, 0.05, 64)
    cfg = TrainConfig(epochs=pre.epochs, lr=pre.lr)
    drops = [e for e in range(1, 240) if learning_rate(cfg, e) < learning_rate(cfg, e - 1)]
    assert drops == [150, 180, 210]
    write_cifar(tmp_path / "data", "cifar100", archive=True)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "KDBOOK_DATA": str(tmp_path / "data"),
           "KDBOOK_CACHE": str(tmp_path / "cache")}
    r = kdbook("run", "--data", "cifar100", "--teachers", "resnet8,resnet8", "--student", "resnet8", "--methods", "aver,aekd,aekd_feat",
               "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--batch-size", "4", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    # six test images: every run finishes, and none can be told from chance (so each is marked diverged)
    assert sorted(res["runs"]) == ["aekd/0", "aekd_feat/0", "aver/0", "student/0"]
    assert {v["status"] for v in res["runs"].values()} <= {"ok", "diverged"}
    r = kdbook("run", "--data", "cifar100", "--recipe", "aekd-paper", "--teachers", "resnet8,resnet8", "--student", "resnet8",
               "--methods", "aekd", "--epochs", "2", "--teacher-epochs", "1", "--seeds", "1", "--batch-size", "4",
               "--out", str(tmp_path / "paper"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "paper" / "results.json").read_text())
    assert res["config"]["cfg"]["milestones"] == [150 / 350, 200 / 350, 250 / 350, 300 / 350] and res["config"]["cfg"]["epochs"] == 2


def test_a_method_from_an_installed_package_runs_from_the_command(tmp_path):
    "A package of the user's declares its module under the `kdbook.methods` entry points; `kdbook run` finds it by name."
    site = tmp_path / "site"
    (site / "kdbook_plugin_demo-0.1.dist-info").mkdir(parents=True)
    (site / "kdbook_plugin_demo-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kdbook-plugin-demo\nVersion: 0.1\n")
    (site / "kdbook_plugin_demo-0.1.dist-info" / "entry_points.txt").write_text("[kdbook.methods]\ndemo = kdbook_plugin_demo\n")
    (site / "kdbook_plugin_demo.py").write_text(
        "import torch.nn.functional as F\nfrom kdbook.learner import Method, register_method\n\n"
        "@register_method\nclass Tempered(Method):\n    name = 'tempered_ce'\n"
        "    def __init__(self, eps: float = 0.1): super().__init__(); self.eps = eps\n"
        "    def loss(self, batch, s, t): return {'loss': F.cross_entropy(s.logits, batch[1], label_smoothing=self.eps)}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "KDBOOK_CACHE": str(tmp_path / "cache")}
    r = kdbook("run", "--methods", "tempered_ce,aver", "--set", "tempered_ce.eps=0.2", "--epochs", "1", "--teacher-epochs", "1",
               "--seeds", "1", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["runs"]["tempered_ce/0"]["status"] == "ok" and res["runs"]["tempered_ce/0"]["hparams"] == {"eps": 0.2}
    assert res["runs"]["aver/0"]["status"] == "ok"                      # the book's methods are still found beside it
    broken = kdbook("run", "--methods", "nope", "--out", str(tmp_path / "o2"), env=env)
    assert broken.returncode == 2 and "tempered_ce" in broken.stderr    # the error lists the plugin's method too


def _combination_inputs(tmp):
    "Bad combinations and values `kdbook run` and `kdbook bench` refuse before anything trains: (arguments, key part)."
    (tmp / "cache_file").write_text("x")
    rows = [
        (["run", "--device", "cuda:abc"], "--device 'cuda:abc' is malformed: expected cuda or cuda:N"),
        (["run", "--device", "cuda:"], "--device 'cuda:' is malformed"),
        (["run", "--student", "mlp_tiny,cnn_small"], "one student architecture, got 2: mlp_tiny, cnn_small"),
        (["run", "--out", ""], "--out is empty: give the folder to write into"),
        (["run", "--out", "  "], "--out is empty"),
        (["run", "--methods", "ka"], "'ka' amalgamates experts over class groups: it needs --experts N"),
        (["run", "--methods", "aver,cfl"], "'cfl' amalgamates experts over class groups: it needs --experts N"),
        (["run", "--methods", "aekd", "--teachers", "mlp"],
         "--methods aekd cannot train with teachers mlp and student mlp_tiny: C must be in [1/M, 1] = [1, 1] for M=1"),
        (["bench", "--device", "cuda:abc"], "--device 'cuda:abc' is malformed"),
        (["run", "--env-cache-file"], "the teacher cache (KDBOOK_CACHE)"),
    ]
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        rows.append((["run", "--device", "mps"], "--device mps: this machine has no MPS (Apple GPU) device"))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n: rows.append((["bench", "--device", f"cuda:{n}"], f"this machine has {n} CUDA device(s)"))
    else:
        rows.append((["bench", "--device", "cuda:7"], "--device cuda:7: CUDA is not available on this machine"))
        rows.append((["run", "--device", "cuda:1"], "--device cuda:1: CUDA is not available on this machine"))
    return rows


def test_every_bad_combination_is_one_line_exit_2_before_anything_trains(tmp_path, monkeypatch, capsys):
    "Devices that are not there or malformed, one student, an empty --out, a method/teacher/expert combination that cannot "
    "train, a cache that is a file: each refused with one line, exit 2, nothing trained, no traceback."
    for args, msg in _combination_inputs(tmp_path):
        cache = tmp_path / ("cache_file" if "--env-cache-file" in args else "cache")
        monkeypatch.setenv("KDBOOK_CACHE", str(cache))
        args = [a for a in args if a != "--env-cache-file"]
        argv = args + ([] if "--out" in args or args[0] != "run" else ["--out", str(tmp_path / "out")])
        try: code = cli.main(argv)
        except SystemExit as e: code = e.code
        out, err = capsys.readouterr()
        assert code == 2, (args, code, err)
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith("usage:") and not l.startswith(" ")]
        assert len(lines) == 1 and msg in lines[0], (args, err)
        assert "training" not in out and "top-1" not in out, (args, out)
    assert not (tmp_path / "cache" / "teachers").exists() and not (tmp_path / "out" / "runs").exists()


def test_a_diverging_teacher_stops_with_one_line_naming_it_and_the_epoch(env, tmp_path):
    r = kdbook("run", "--lr", "1e30", "--methods", "aver", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1",
               "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 1, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"teacher mlp \(seed 0\) diverged: the loss became NaN or inf at epoch 1, step \d+", lines[0]), lines
    assert not (tmp_path / "out" / "runs").exists()                  # no student trained against it


def test_sigterm_stops_cleanly_says_how_to_resume_and_exits_143(env, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", "import sys; from kdbook.cli import main; sys.exit(main())", "run",
                          "--epochs", "200", "--teacher-epochs", "2", "--seeds", "1", "--methods", "aver", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not list((out / "runs").glob("student/*/checkpoints/latest")) and time.time() < deadline: time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, (p.returncode, stderr)
    assert "Traceback" not in stderr and "terminated (SIGTERM)" in stderr and "run the same command again to resume" in stderr
    assert list((out / "runs").glob("student/*/checkpoints/epoch-*")), "the stopped run's checkpoints were kept"
