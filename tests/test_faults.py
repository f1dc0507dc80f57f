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
    assert stdout.count("training teacher") == 2, stdout            # each teacher once, into one cache
    assert len(_trained_lines(stdout)) == 4, stdout                  # ce/0, ce/1, aver/0, aver/1: each trained once
    assert "waiting for it to finish" in "".join(e for _, e in done)
    for o, e in done: assert "Traceback" not in e, e
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["runs"]) == ["aver/0", "aver/1", "ce/0", "ce/1"]
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
        except FileNotFoundError: continue                          # an old folder removed while it was read
        finally: os.close(fd)
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
