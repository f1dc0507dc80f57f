"""What a new user meets first: fast help, one-line data errors with no download unless asked, diverged runs flagged,
re-runs that say what changed and keep other methods' runs, one name for the student alone."""
import json, subprocess, sys, time
from pathlib import Path

import pytest

from kdbook import cli, data as kdata, study

def kdbook(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-c", "import sys; from kdbook.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)

@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    "No copy of any dataset anywhere kdbook looks, and any download attempt fails the test."
    for var, sub in (("HOME", "home"), ("KDBOOK_DATA", "data"), ("KDBOOK_CACHE", "cache")):
        (tmp_path / sub).mkdir(); monkeypatch.setenv(var, str(tmp_path / sub))
    (tmp_path / "system").mkdir()
    monkeypatch.setattr(kdata, "SYSTEM_FASHION_MNIST", str(tmp_path / "system"))
    attempts = []
    def no_download(name, dest): attempts.append(name); raise AssertionError("a download was attempted")
    monkeypatch.setattr(kdata, "_download", no_download)
    return attempts

def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    return lines[0]

@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "cifar100"])
def test_a_missing_dataset_is_one_line_no_download_and_no_out_folder(name, nowhere, tmp_path, capsys):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code = cli.main(["run", "--data", name, "--out", str(out)])
    secs = time.perf_counter() - t0
    o, err = capsys.readouterr()
    assert code == 2 and o == "" and nowhere == [], (code, o, err)
    line = _one_error_line(err)
    assert line.startswith(f"kdbook: error: {name}: no copy found (looked in ") and str(tmp_path / "data") in line
    assert f"get it with: kdbook data --download {name}" in line and "download=True" not in line
    assert not out.exists(), "nothing is created in --out before the data is found"
    assert secs < 5, secs   # no network attempt (one took 26 s where there was no network)

def test_download_when_asked_and_its_failure_is_one_line(nowhere, tmp_path, monkeypatch, capsys):
    import urllib.error
    def offline(name, dest): nowhere.append(name); raise urllib.error.URLError("[Errno -3] Temporary failure\nmore")
    monkeypatch.setattr(kdata, "_download", offline)
    assert cli.main(["data", "--download", "cifar10"]) == 2
    o, err = capsys.readouterr()
    assert nowhere == ["cifar10"] and "downloading cifar10 through torchvision" in o
    line = _one_error_line(err)
    assert "cifar10: the download failed (URLError: <urlopen error [Errno -3] Temporary failure)" in line, line
    assert cli.main(["run", "--data", "cifar10", "--download", "--out", str(tmp_path / "o")]) == 2
    assert nowhere == ["cifar10", "cifar10"] and not (tmp_path / "o").exists()

def test_data_download_puts_a_copy_where_the_loader_finds_it(nowhere, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import write_cifar
    def fake(name, dest): write_cifar(dest, name, archive=False); return dest / kdata._CIFAR[name][0]
    monkeypatch.setattr(kdata, "_download", fake)
    assert cli.main(["data", "--download", "cifar10"]) == 0
    o = capsys.readouterr().out
    assert f"cifar10        found: {tmp_path / 'cache' / 'cifar-10-batches-py'}" in o, o
    assert cli.main(["data", "--download", "cifar10"]) == 0   # found: nothing downloaded again
    assert "downloading" not in capsys.readouterr().out

def test_wrong_names_still_list_the_valid_ones(capsys):
    for argv, msg in [(["run", "--methods", "aver,foo"], "unknown method 'foo'; valid: ce, aver, "),
                      (["run", "--teachers", "mlp,resnet21"], "unknown model 'resnet21'; valid: resnet8"),
                      (["run", "--data", "mnist"], "invalid choice: 'mnist' (choose from digits, fashion-mnist, cifar10, cifar100)"),
                      (["run", "--backend", "mpi"], "invalid choice: 'mpi'"),
                      (["data", "--download", "mnist"], "invalid choice: 'mnist'"),
                      (["bench", "--only", "loader,warp"], "unknown stage(s) 'warp'; valid: loader, teacher_bank,"),
                      (["bench", "--peer", "--quick"], "--peer is a comparison of its own")]:
        try: code = cli.main(argv)
        except SystemExit as e: code = e.code
        err = capsys.readouterr().err
        assert code == 2 and msg in err, (argv, err)
        assert len([l for l in err.splitlines() if l.startswith("kdbook") or "error" in l]) == 1, err

def test_the_lr_help_says_the_teachers_train_at_it():
    text = " ".join(kdbook("run", "--help").stdout.split())
    assert "peak learning rate of the students and of the teachers: teachers at a new lr are trained again" in text

_IMPORTS_AFTER = "import sys\nfrom kdbook.cli import main\ntry: main(sys.argv[1:])\nexcept SystemExit: pass\n" \
                 "print('torch' in sys.modules, [m for m in sys.modules if m.startswith('kdbook.') and m != 'kdbook.cli'])"

@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["data", "--help"], ["bench", "--help"],
                                  ["run", "--epochs", "0"]])
def test_help_and_a_mistyped_flag_import_no_torch(argv):
    "`kdbook --help` (each command's help too, and a malformed number) answers without importing torch or a chapter."
    r = subprocess.run([sys.executable, "-c", _IMPORTS_AFTER, *argv], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "False []", (argv, r.stdout[-500:], r.stderr[-500:])

def test_bench_help_lists_the_stages_chapter_30_defines():
    "The stage names `bench --help` reads from bench.py's source are the ones `kdbook.bench` defines, in order."
    from kdbook.bench import BENCH_STAGES, QUICK_STAGES
    assert cli._bench_stage_names() == (list(BENCH_STAGES), QUICK_STAGES)
    text = " ".join(kdbook("bench", "--help").stdout.split())
    assert "stages: " + ", ".join(BENCH_STAGES) in text and "(" + ", ".join(QUICK_STAGES) + ")" in text

def _results(out: Path) -> dict: return json.loads((out / "results.json").read_text())

def test_diverged_run_rerun_message_kept_methods_and_the_student_label(tmp_path, monkeypatch, capsys):
    "One digits study, 1 epoch: other methods' runs are kept; a changed lr is named; a run that learns nothing is flagged."
    import torch, torch.nn.functional as F
    from kdbook import learner
    from kdbook.learner import Method, register_method
    monkeypatch.setattr(learner, "METHODS", dict(learner.registered_methods()))   # registered for this test only
    @register_method
    class Stuck(Method):   # trains every image towards class 0: 10% on the digits, chance
        name = "stuck"
        def loss(self, batch, s, t): return {"loss": F.cross_entropy(s.logits, torch.zeros_like(batch[1]))}
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    out, base = tmp_path / "out", ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--out", str(tmp_path / "out")]
    assert cli.main(["run", "--methods", "aver", *base]) == 0
    o = capsys.readouterr().out
    res = _results(out)
    assert sorted(res["runs"]) == ["aver/0", "student/0"] and res["summary"][0]["method"] == "student"
    assert [l.split()[0] for l in o.splitlines() if " seed 0: " in l] == ["student", "aver"]   # the per-seed lines
    assert o.count("] 1/1 epochs") == 3   # one line per teacher, not one per epoch
    # other methods in the same folder: aver's record stays, and the summary shows it (same settings)
    assert cli.main(["run", "--methods", "stuck", *base]) == 0
    o, err = capsys.readouterr()
    res = _results(out)
    assert sorted(res["runs"]) == ["aver/0", "stuck/0", "student/0"] and res["runs"]["aver/0"]["kept"]
    assert [r["method"] for r in res["summary"]] == ["student", "stuck", "aver"]
    assert "reused 1 finished runs" in o
    # the run that learned nothing: 'diverged' in results.json, a warning, a mark in the table and the report
    assert res["runs"]["stuck/0"]["status"] == "diverged" and res["runs"]["aver/0"]["status"] == "ok"
    assert "stuck      seed 0: top-1 " in o and "DIVERGED: top-1 " in o and "is not above chance (10.00% for 10 classes)" in o
    assert "kdbook: warning: stuck diverged in 1 of 1 seeds" in err and "try a lower --lr" in err
    row = next(l for l in o.splitlines() if l.startswith("stuck ") and " seed " not in l)
    assert "!" in row and "diverged in 1 of 1 seeds" in row
    report = (out / "report.html").read_text()
    assert "Diverged:</b> stuck" in report and all(f"<b>{m}</b>" in report for m in ("student", "aver", "stuck"))
    # another lr: the re-run line names it; aver's run had the old settings, so it is kept but not shown
    assert cli.main(["run", "--methods", "stuck", *base, "--lr", "0.1"]) == 0
    o = capsys.readouterr().out
    assert "student    seed 0: settings changed since the run in" in o
    assert "(lr 0.05 -> 0.1, teachers' lr 0.05 -> 0.1); training again" in o, o
    res = _results(out)
    assert [r["method"] for r in res["summary"]] == ["student", "stuck"] and "aver/0" in res["runs"]

def test_an_earlier_results_json_that_says_ce_is_read_as_student(tmp_path, monkeypatch, capsys):
    from kdbook.data import load_dataset
    from kdbook.learner import TrainConfig
    ds, cfg = load_dataset("digits").subset(300, 100), TrainConfig(epochs=1, batch_size=64)
    old = study.run_study(ds, None, "mlp_tiny", [], cfg=cfg, out=tmp_path)   # the library's default label: ce
    assert list(old.runs) == ["ce/0"] and json.loads((tmp_path / "results.json").read_text())["runs"]["ce/0"]
    lines = []
    new = study.run_study(ds, None, "mlp_tiny", [], cfg=cfg, out=tmp_path, baseline="student", log=lines.append)
    assert list(new.runs) == ["student/0"] and new.runs["student/0"]["reused"], lines
    assert new.runs["student/0"]["top1"] == old.runs["ce/0"]["top1"] and lines[0].startswith("student    seed 0: top-1")
    assert [r["method"] for r in new.summary()] == ["student"] and new.summary()[0]["baseline"]
    assert cli.format_table(new.summary()).splitlines()[1].startswith("student")
    assert cli.format_table(old.summary()).splitlines()[1].startswith("student")   # an old file's rows print the same
