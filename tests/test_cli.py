"The `kdbook` command end to end: bad input, a short study, the report in a real browser, failures kept apart."
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

from kdbook import cli

def kdbook(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-c", "import sys; from kdbook.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=900)

@pytest.fixture
def env(tmp_path):
    return {**os.environ, "KDBOOK_CACHE": str(tmp_path / "cache")}

@pytest.mark.parametrize("args, msg", [
    (["run", "--methods", "aver,foo"], "unknown method 'foo'; valid: ce, aver, ebkd, camkd, fitnet, aekd, aekd_feat"),
    (["run", "--teachers", "mlp,resnet21"], "unknown model 'resnet21'; valid: resnet8"),
    (["run", "--student", "vgg7"], "unknown model 'vgg7'"),
    (["run", "--data", "mnist"], "invalid choice: 'mnist'"),
    (["run", "--epochs", "0"], "must be an integer >= 1, got '0'"),
    (["run", "--seeds", "two"], "must be an integer >= 1, got 'two'"),
    (["run", "--set", "aekd.D=1"], "method 'aekd' has no parameter 'D'"),
    (["run", "--set", "aekd.C=5", "--methods", "aekd"], "C must be a number in (0, 1]"),
    (["run", "--set", "aver.T=-1", "--methods", "aver"], "temperature T must be a finite number > 0, got -1"),
    (["frobnicate"], "invalid choice: 'frobnicate'")])
def test_bad_input_exits_2_with_the_valid_values(args, msg, env, tmp_path):
    r = kdbook(*args, "--out", str(tmp_path / "out")) if args[0] == "run" else kdbook(*args)
    assert r.returncode == 2, r
    assert msg in r.stderr, r.stderr
    assert not (tmp_path / "cache" / "teachers").exists()   # nothing was trained

def test_short_study_table_results_and_report(env, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--epochs", "2", "--teacher-epochs", "2", "--seeds", "2", "--methods", "aver,aekd", "--out", str(out)]
    r = kdbook(*args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("method"))
    assert [l.split()[0] for l in lines[header + 1:header + 4]] == ["student", "aver", "aekd"]
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["runs"]) == ["aekd/0", "aekd/1", "aver/0", "aver/1", "ce/0", "ce/1"]
    assert all(run["status"] == "ok" and 0 < run["top1"] <= 100 for run in res["runs"].values())
    assert [row["method"] for row in res["summary"]] == ["ce", "aver", "aekd"]
    # run again: every finished run is reused, nothing is retrained
    r2 = kdbook(*args, env=env)
    assert r2.returncode == 0 and "reusing 6 finished runs" in r2.stdout, r2.stdout
    assert json.loads((out / "results.json").read_text())["summary"] == res["summary"]

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None: pytest.skip("no Chromium to open report.html (.ci/run installs it)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="main-svg"') >= 2, dom[:2000]   # plotly drew both figures, offline

def test_a_failing_method_is_reported_and_the_others_kept(tmp_path, monkeypatch):
    class Broken(cli.METHODS["aver"]):
        name = "broken"
        def loss(self, batch, s, t): raise RuntimeError("this method is broken on purpose")
    monkeypatch.setitem(cli.METHODS, "broken", Broken)
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    res = cli.run_study("digits", methods=["aver", "broken"], epochs=1, teacher_epochs=1, seeds=1,
                        out=tmp_path / "out", log=lambda *a: None)
    assert res["runs"]["aver/0"]["status"] == "ok" and res["runs"]["ce/0"]["status"] == "ok"
    assert res["runs"]["broken/0"]["status"] == "failed"
    assert "this method is broken on purpose" in res["runs"]["broken/0"]["error"]
    table = cli.format_table(res["summary"])
    assert "broken" in table and "failed" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"]["aver/0"]["status"] == "ok"

def test_data_lists_every_dataset_and_where():
    r = kdbook("data")
    assert r.returncode == 0
    names = [l.split()[0] for l in r.stdout.splitlines()]
    assert names == ["digits", "fashion-mnist", "cifar10", "cifar100"]
    assert "found" in r.stdout

@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_copy(env, tmp_path):
    r = kdbook("run", "--data", "fashion-mnist", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1",
               "--methods", "aekd", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/usr/share/datasets/fashion-mnist" in r.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["runs"]["aekd/0"]["top1"] > 50

def test_cifar100_recipe_command_on_a_small_archive_in_the_real_format(tmp_path):
    "The paper's CIFAR-100 recipe is the preset; its command path runs here on a tiny archive in CIFAR's format."
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
    assert {k: v["status"] for k, v in res["runs"].items()} == {"ce/0": "ok", "aver/0": "ok", "aekd/0": "ok", "aekd_feat/0": "ok"}
