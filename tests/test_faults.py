"""Faults a run meets outside the happy path: two runs in one folder, corrupt checkpoints and cache entries, a garbled
results.json, a full disk, SIGTERM. Each test makes the fault for real (processes started together, truncated files,
a small tmpfs) and checks that nothing finished is lost and that every message names the path."""
import json, logging, multiprocessing as mp, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

from kdbook import learner, study
from kdbook.data import load_dataset
from kdbook.learner import (CheckpointCallback, Distiller, TrainConfig, WriteError, atomic_write_dir, atomic_write_text,
                            remove_stale_temporaries)
from kdbook.models import create_model

CLI = [sys.executable, "-c", "import sys; from kdbook.cli import main; sys.exit(main())"]
SMALL = ["--teachers", "mlp,mlp_wide", "--student", "mlp_tiny", "--methods", "aver", "--epochs", "2",
         "--teacher-epochs", "1", "--seeds", "2"]


@pytest.fixture(scope="module")
def digits(): return load_dataset("digits")


def _env(tmp_path) -> dict:
    return {**os.environ, "KDBOOK_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}


def _trained_lines(text: str) -> list:
    "The per-run lines of runs this process trained (not reused)."
    return [l for l in text.splitlines() if re.match(r"\S+\s+seed \d+: top-1 [\d.]+%  \([\d.]+s\)$", l)]


# ---------------------------------------------------------------------------------------------- two runs at once
def test_three_runs_started_together_in_one_folder_train_each_run_and_teacher_once(tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(CLI + ["run", *SMALL, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(tmp_path)) for _ in range(3)]
    done = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in done]
    stdout = "".join(o for o, _ in done)
    trained = [l for l in stdout.splitlines() if re.match(r"teacher \S+ \(seed \d+\) \[#+\] ", l)]   # a teacher's bar
    assert len(trained) == 2, stdout                                 # each teacher once, into one cache
    assert len(_trained_lines(stdout)) == 4, stdout                  # student/0, student/1, aver/0, aver/1: each trained once
    assert "waiting for it to finish" in "".join(e for _, e in done)
    for o, e in done: assert "Traceback" not in e, e
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["runs"]) == ["aver/0", "aver/1", "student/0", "student/1"]
    assert all(r["status"] == "ok" for r in res["runs"].values()), res["runs"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def _write_many(path, tag, n, errors):
    try:
        for i in range(n):
            atomic_write_dir(path, lambda tmp: [(tmp / f"f{j}").write_text(f"{tag}-{i}") for j in range(20)])
    except BaseException as e: errors.put(repr(e))


def test_atomic_write_dir_tolerates_concurrent_writers(tmp_path):
    "Four processes replace one folder 30 times each: no error, and the folder always holds one writer's complete set."
    ctx, target = mp.get_context("fork"), tmp_path / "entry"
    errors = ctx.Queue()
    procs = [ctx.Process(target=_write_many, args=(target, t, 30, errors)) for t in range(4)]
    for p in procs: p.start()
    seen = 0
    while any(p.is_alive() for p in procs):
        try: fd = os.open(target, os.O_RDONLY)    # one folder, even if it is renamed while it is read
        except (FileNotFoundError, NotADirectoryError): continue    # between a writer's two renames
        try:
            names = os.listdir(fd)
            texts = {open(n, opener=lambda n, fl: os.open(n, fl, dir_fd=fd)).read() for n in names}
            try: still_there = os.stat(target).st_ino == os.fstat(fd).st_ino
            except (FileNotFoundError, NotADirectoryError): still_there = False
        except FileNotFoundError: continue                          # an old folder removed while it was read
        finally: os.close(fd)
        if not still_there: continue   # set aside (and being removed) while it was read: not the folder at `target`
        assert len(names) == 20 and len(texts) == 1, texts          # one writer's complete set, never a mix
        seen += 1
    for p in procs: p.join()
    assert seen > 0 and errors.empty(), errors.get()
    assert len({f.read_text() for f in target.iterdir()}) == 1 and len(list(target.iterdir())) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]   # no temporary or set-aside folder left


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)                                           # a process that has exited
    for name in (f".epoch-0003.tmp-{pid}", f".latest.tmp-{pid}", f".epoch-0002.old-{pid}-0",
                 f".epoch-0004.tmp-{os.getpid()}", "keep.tmp-1", "epoch-0001"):
        (tmp_path / name).mkdir() if "epoch" in name else (tmp_path / name).write_text("x")
    gone = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in gone) == sorted([f".epoch-0003.tmp-{pid}", f".latest.tmp-{pid}", f".epoch-0002.old-{pid}-0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".epoch-0004.tmp-{os.getpid()}", "keep.tmp-1", "epoch-0001"])


# ---------------------------------------------------------------------------------------------- corrupt files
class _StopAfter(learner.Callback):
    order = 20   # after the checkpointer: the run dies once epoch n is on disk
    def __init__(self, n): self.n = n
    def after_epoch(self, learn):
        if learn.epoch + 1 == self.n: raise KeyboardInterrupt


def _run(digits, out_dir=None, stop=None, resume=False):
    torch.manual_seed(0)
    d = Distiller(create_model("mlp_tiny", 10, 1), data=digits, cfg=TrainConfig(epochs=4, batch_size=128), out_dir=out_dir,
                  resume=resume, progress=False, callbacks=[_StopAfter(stop)] if stop else [])
    try: d.fit()
    except KeyboardInterrupt: pass
    return d


def _truncate(path: Path, keep: float = 0.5): path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


@pytest.mark.parametrize("damage", ["weights.safetensors", "meta.json", "optimizer.safetensors", "rng.safetensors",
                                    "latest", "latest-empty"])
def test_an_unreadable_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(digits, tmp_path, caplog, damage):
    full = _run(digits)                                              # never interrupted: the reference
    _run(digits, tmp_path, stop=3)                                   # dies after epoch 3: epoch-0002 and epoch-0003 kept
    ck = tmp_path / "checkpoints"
    if damage == "latest-empty": (ck / "latest").write_text("")
    elif damage == "latest": _truncate(ck / "latest", 0.6)           # "epoch-0003" -> "epoch-"
    else: _truncate(ck / "epoch-0003" / damage)
    with caplog.at_level(logging.WARNING, logger="kdbook"): again = _run(digits, tmp_path, resume=True)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1, notes
    if damage.startswith("latest"):                                  # the pointer is set aside; epoch 3 is intact
        assert str(ck / "latest") in notes[0] and (ck / "latest.unreadable").exists()
        assert (ck / "epoch-0004").is_dir()
    else:
        assert str(ck / "epoch-0003" / damage) in notes[0] and "set aside as" in notes[0]
        assert (ck / "epoch-0003.unreadable" / damage).exists()     # renamed, not deleted
    assert [r["epoch"] for r in again.history] == [0, 1, 2, 3]
    for (k, a), b in zip(full.student.state_dict().items(), again.student.state_dict().values()):
        assert torch.equal(a, b), k                                  # the same weights as the run never interrupted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdbook"): _run(digits, tmp_path, resume=True)
    assert not caplog.records                                        # the damage is not met a second time


def test_every_checkpoint_unreadable_starts_over_and_says_so(digits, tmp_path, caplog):
    _run(digits, tmp_path, stop=3)
    ck = tmp_path / "checkpoints"
    for p in ck.glob("epoch-*"): _truncate(p / "weights.safetensors")
    with caplog.at_level(logging.WARNING, logger="kdbook"): again = _run(digits, tmp_path, resume=True)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2 and "training from the start" in notes[1], notes
    assert [r["epoch"] for r in again.history] == [0, 1, 2, 3]
    for (k, a), b in zip(_run(digits).student.state_dict().items(), again.student.state_dict().values()):
        assert torch.equal(a, b), k
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["epoch-0002.unreadable", "epoch-0003", "epoch-0003.unreadable",
                                                                    "epoch-0004"]


def _damage_entry(entry: Path, how: str):
    if how == "truncated weights": _truncate(entry / "weights.safetensors")
    elif how == "truncated info": _truncate(entry / "info.json")
    elif how == "info without accuracy":
        info = json.loads((entry / "info.json").read_text()); del info["test_top1"]
        (entry / "info.json").write_text(json.dumps(info))
    elif how == "another architecture":
        from safetensors.torch import save_file
        save_file(create_model("mlp_wide", 10, 1).state_dict(), str(entry / "weights.safetensors"))
    elif how == "no weights": (entry / "weights.safetensors").unlink()


@pytest.mark.parametrize("how", ["truncated weights", "truncated info", "info without accuracy", "another architecture",
                                 "no weights"])
def test_an_unreadable_cached_teacher_is_trained_again_once(digits, tmp_path, caplog, how):
    cfg = TrainConfig(epochs=1, batch_size=128)
    first, = study.train_teachers(["mlp"], digits, cfg=cfg, cache=tmp_path, progress=False, verbose=False)
    entry = tmp_path / first.info["key"]
    _damage_entry(entry, how)
    with caplog.at_level(logging.WARNING, logger="kdbook"):
        again, = study.train_teachers(["mlp"], digits, cfg=cfg, cache=tmp_path, progress=False, verbose=False)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and str(entry) in notes[0] and "training it again" in notes[0], notes
    assert again.info["cached"] is False
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()): assert torch.equal(a, b), k
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdbook"):
        third, = study.train_teachers(["mlp"], digits, cfg=cfg, cache=tmp_path, progress=False, verbose=False)
    assert third.info["cached"] is True and not caplog.records       # repaired: loaded, no notice


def _study(digits, out, log=None):
    return study.run_study(digits, None, "mlp_tiny", [], seeds=(0, 1), cfg=TrainConfig(epochs=1, batch_size=128), out=out,
                           log=log)


@pytest.mark.parametrize("how", ["runs is a list", "record without top1", "a folder", "truncated", "not json"])
def test_an_unreadable_results_json_is_kept_aside_and_rebuilt_from_the_runs_records(digits, tmp_path, caplog, how):
    first = _study(digits, tmp_path)
    res = tmp_path / "results.json"
    good = json.loads(res.read_text())
    if how == "runs is a list": res.write_text('{"runs": []}')
    elif how == "record without top1":
        bad = json.loads(res.read_text()); del bad["runs"]["ce/1"]["top1"]; res.write_text(json.dumps(bad))
    elif how == "a folder": res.unlink(); res.mkdir(); (res / "x").write_text("x")
    elif how == "truncated": _truncate(res)
    else: res.write_bytes(b"\xff\xfe garbage")
    before = (res / "x").read_text() if how == "a folder" else res.read_text(errors="replace")
    lines = []
    with caplog.at_level(logging.WARNING, logger="kdbook"): again = _study(digits, tmp_path, log=lines.append)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and str(res) in notes[0] and "set aside as" in notes[0], notes
    aside = tmp_path / "results.json.unreadable"
    assert ((aside / "x").read_text() if how == "a folder" else aside.read_text(errors="replace")) == before
    assert all("reused" in l for l in lines) and len(lines) == 2, lines   # nothing trained again
    assert {k: r["top1"] for k, r in again.runs.items()} == {k: r["top1"] for k, r in first.runs.items()}
    assert json.loads(res.read_text())["summary"] == good["summary"]


# ---------------------------------------------------------------------------------------------- a full disk
def _tmpfs_reason() -> str | None:
    "Why a small tmpfs cannot be mounted in a user and mount namespace here (None: it can)."
    if not shutil.which("unshare"): return "no unshare command (util-linux)"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"no tmpfs in a mount namespace here: {r.stderr.strip()[:200]}"


def _on_small_tmpfs(tmp_path, size: str, where: str) -> dict:
    """`kdbook run` with `where` ('out' or 'cache') on a tmpfs of `size`, then again after the tmpfs grew to 64 MB; the
    exit codes, outputs and copies of the folder after each run (the tmpfs lives only in its namespace)."""
    mnt, out, cache = tmp_path / "mnt", tmp_path / "out", tmp_path / "cache"
    mnt.mkdir()
    if where == "out": out = mnt / "out"
    else: cache = mnt / "cache"
    cmd = " ".join(CLI[:2]) + f" '{CLI[2]}' run " + " ".join(SMALL) + f" --out {out}"
    script = f"""mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99
        {cmd} > {tmp_path}/o1 2> {tmp_path}/e1; echo $? > {tmp_path}/rc1; cp -r {mnt} {tmp_path}/after1
        mount -o remount,size=64m {mnt}
        {cmd} > {tmp_path}/o2 2> {tmp_path}/e2; echo $? > {tmp_path}/rc2; cp -r {mnt} {tmp_path}/after2"""
    env = {**_env(tmp_path), "KDBOOK_CACHE": str(cache)}
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    read = lambda n: (tmp_path / n).read_text()
    return {"rc": [int(read("rc1")), int(read("rc2"))], "out": [read("o1"), read("o2")], "err": [read("e1"), read("e2")],
            "after": [tmp_path / "after1", tmp_path / "after2"]}


@pytest.mark.parametrize("size,where", [("150k", "out"), ("1m", "out"), ("500k", "cache")])
def test_a_full_disk_is_one_line_exit_1_leaves_no_temporary_and_loses_nothing_finished(tmp_path, size, where):
    reason = _tmpfs_reason()
    if reason: pytest.skip(reason)
    r = _on_small_tmpfs(tmp_path, size, where)
    assert r["rc"][0] == 1, r["err"][0]
    lines = [l for l in r["err"][0].splitlines() if l.strip() and "waiting for it" not in l]
    assert len(lines) == 1 and "Traceback" not in r["err"][0], r["err"][0]
    m = re.fullmatch(r"kdbook: error: cannot write (\S+) \(([\d,]+) bytes to write\): No space left on device", lines[0])
    assert m, lines[0]
    assert Path(m[1]).is_relative_to(tmp_path / "mnt"), m[1]       # the path on the full tmpfs
    first = r["after"][0]
    assert not [p for p in first.rglob("*") if ".tmp-" in p.name], sorted(first.rglob("*"))
    finished = {}
    if (first / "out" / "results.json").exists():                    # every run recorded is complete and kept
        finished = json.loads((first / "out" / "results.json").read_text())["runs"]
        assert all(v["status"] == "ok" for v in finished.values()), finished
    # the disk grows: the same command finishes, and nothing finished before is trained again
    assert r["rc"][1] == 0, r["err"][1]
    for name in finished:
        label, seed = name.split("/")
        assert re.search(rf"^{label}\s+seed {seed}: top-1 .*reused", r["out"][1], re.M), (name, r["out"][1])
    res = json.loads(((r["after"][1] / "out") if where == "out" else tmp_path / "out").joinpath("results.json").read_text())
    assert sorted(res["runs"]) == ["aver/0", "aver/1", "student/0", "student/1"]
    assert all(v["status"] == "ok" for v in res["runs"].values())
    assert not [p for p in r["after"][1].rglob("*") if ".tmp-" in p.name]


def test_an_unwritable_results_json_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    "A results.json that cannot be replaced (immutable, or on a read-only mount): simulated, as root may write anything."
    from kdbook import cli
    real = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith("results.json"): raise PermissionError(1, "Operation not permitted", str(dst))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    code = cli.main(["run", *SMALL[:6], "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines == [f"kdbook: error: cannot write {tmp_path / 'o' / 'results.json'} ("
                     f"{lines[0].split('(')[1].split(' bytes')[0]} bytes to write): Operation not permitted"], lines
    assert not [p for p in (tmp_path / "o").rglob("*") if ".tmp-" in p.name]


def test_a_simulated_full_disk_in_a_checkpoint_write_stops_the_study(tmp_path, monkeypatch, capsys):
    "ENOSPC in the middle of writing a checkpoint file: one line naming the checkpoint, exit 1, no temporary folder left."
    import errno
    from kdbook import cli
    real = Path.write_bytes
    def write_bytes(self, data):
        if self.name == "optimizer.safetensors" and "aver" in str(self):
            real(self, data[:10]); raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    code = cli.main(["run", *SMALL[:6], "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 1 and len(lines) == 1, err
    assert re.fullmatch(rf"kdbook: error: cannot write {re.escape(str(tmp_path / 'o' / 'runs' / 'aver'))}/seed0-\w+/checkpoints/"
                        r"epoch-0001 \([\d,]+ bytes to write\): No space left on device", lines[0]), lines[0]
    assert not [p for p in (tmp_path / "o").rglob("*") if ".tmp-" in p.name]
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {k: v["status"] for k, v in res["runs"].items()} == {"student/0": "ok"}   # the finished run kept, none recorded failed
