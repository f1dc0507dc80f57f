"""The study runner (chapter 07): runs are paired by seed. For one seed every method starts from the same student
weights, sees the same batches in the same order with the same augmentation, and distils from the same teachers, so the
difference of two methods at one seed is a paired difference (chapter 00's `paired_comparison` rests on this)."""
import hashlib, subprocess, sys

import pytest
import torch
import torch.nn.functional as F

import kdbook.learner as learner
from kdbook.data import load_dataset
from kdbook.learner import Method, TrainConfig, register_method
from kdbook.models import create_model
from kdbook.study import run_study


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def recorder(name: str, scale: float, log: dict):
    "A Method that logs, per run, the student's initial weights, the teachers' weights and every batch it sees."
    class Recorder(Method):
        needs_teachers = True
        def __init__(self, scale: float = scale): super().__init__(); self.scale = scale; self.key = None
        def setup(self, student, bank, batch):
            self.key = (name, len(log)); log[self.key] = {
                "init": [digest(p) for p in student.parameters()],
                "teachers": [digest(p) for p in bank.parameters()], "batches": []}
        def loss(self, batch, s, t):
            log[self.key]["batches"].append((digest(batch[0]), digest(batch[2])))
            return {"loss": self.scale * F.cross_entropy(s.logits, batch[1])}
    Recorder.name = Recorder.__qualname__ = name
    return Recorder


@pytest.fixture
def study(monkeypatch):
    monkeypatch.setattr(learner, "METHODS", dict(learner.registered_methods()))
    log = {}
    for name, scale in (("rec_a", 1.0), ("rec_b", 0.3)): register_method(recorder(name, scale, log))
    data = load_dataset("digits")
    torch.manual_seed(123)
    teachers = [create_model("mlp", data.n_classes, data.in_channels).eval() for _ in range(2)]
    cfg = TrainConfig(epochs=2, batch_size=256, lr=0.05)
    res = run_study(data, teachers, "mlp_tiny", ["rec_a", "rec_b"], seeds=[0, 1], cfg=cfg, baseline=False)
    return res, log


def test_runs_with_one_seed_are_paired(study):
    res, log = study
    runs = list(log.values())            # in the order run_study trains them: rec_a seeds 0, 1, then rec_b seeds 0, 1
    a0, a1, b0, b1 = runs
    for x, y in ((a0, b0), (a1, b1)):    # same seed, other method: the same start, the same teachers, the same batches
        assert x["init"] == y["init"] and x["teachers"] == y["teachers"] and x["batches"] == y["batches"]
    assert a0["init"] != a1["init"] and a0["batches"] != a1["batches"]   # another seed: another start and order
    assert a0["teachers"] == a1["teachers"]                             # the teachers are the study's, for every seed
    assert len(a0["batches"]) == 2 * (len(load_dataset("digits").train) // 256)
    # and the two methods did train differently (otherwise the pairing check above would be vacuous)
    assert res.runs["rec_a/0"]["history"] != res.runs["rec_b/0"]["history"]


def test_no_run_is_charged_for_torchs_one_time_compiler_import():
    """The first optimizer a process builds imports torch's compiler (seconds); `run_study` does that before its first
    run, so the student alone (trained first) does not look slowest in the table. Checked in a fresh process."""
    code = """
import sys, torch
from kdbook import study
from kdbook.data import load_dataset
from kdbook.learner import TrainConfig
seen, train = [], study._train_run
def spy(*a, **k): seen.append("torch._dynamo" in sys.modules); return train(*a, **k)
study._train_run = spy
assert "torch._dynamo" not in sys.modules
study.run_study(load_dataset("digits").subset(64, 32), [], "mlp_tiny", [], seeds=range(1), cfg=TrainConfig(epochs=1, batch_size=32))
print(seen)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[True]", r.stdout
