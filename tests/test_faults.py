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
