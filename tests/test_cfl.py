"Chapter 12, CFL: MMD against loops and its properties, the amalgamation setting's errors, KA and CFL trained, `kdbook run --experts`."
import math

import pytest
import torch
import torch.nn.functional as F

from kdbook.data import load_dataset
from kdbook.learner import Distiller, TrainConfig, make_method
from kdbook.models import create_model
from kdbook.cfl import SIGMAS, Amalgamation, CFL, KA, check_expert_outputs, mmd, public_mmd, union_logits
from conftest import quick_run


@pytest.mark.parametrize("seed", range(4))
def test_mmd_matches_a_loop_and_the_public_code(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(9, 4, generator=g, dtype=torch.float64), 2 * torch.randn(9, 4, generator=g, dtype=torch.float64) + 0.3
    k = lambda a, b: sum(math.exp(-float((a - b).pow(2).sum()) / (2 * s * s)) for s in SIGMAS)
    loop = (sum(k(a, b) for a in x for b in x) + sum(k(a, b) for a in y for b in y) - 2 * sum(k(a, b) for a in x for b in y)) / 81
    torch.testing.assert_close(mmd(x, y), torch.tensor(loop, dtype=torch.float64))
    torch.testing.assert_close(mmd(x, y), public_mmd(x, y), rtol=1e-6, atol=1e-7)
    unb = (sum(k(a, b) for i, a in enumerate(x) for j, b in enumerate(x) if i != j) / 72
           + sum(k(a, b) for i, a in enumerate(y) for j, b in enumerate(y) if i != j) / 72 - 2 * sum(k(a, b) for a in x for b in y) / 81)
    torch.testing.assert_close(mmd(x, y, unbiased=True), torch.tensor(unb, dtype=torch.float64))


def test_biased_mmd_is_nonnegative_and_zero_on_identical_samples():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = torch.randn(12, 3, generator=g), torch.randn(7, 3, generator=g) * 3
        assert mmd(x, y) >= -1e-6
    x = torch.randn(10, 5, generator=g)
    assert abs(float(mmd(x, x))) < 1e-5
    batched = mmd(x.expand(3, 10, 5), torch.stack([x, x + 1, x * 2]))
    torch.testing.assert_close(batched, torch.stack([mmd(x, x), mmd(x, x + 1), mmd(x, x * 2)]))


def test_the_setting_refuses_bad_groups():
    digits = load_dataset("digits")
    with pytest.raises(ValueError, match="class 3 belongs to expert 0 and to expert 1"): Amalgamation(digits, [[0, 1, 2, 3], [3, 4, 5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match=r"classes \[9\] belong to no expert"): Amalgamation(digits, [[0, 1, 2, 3], [4, 5, 6, 7, 8]])
    with pytest.raises(ValueError, match="expert 1 has 1 class"): Amalgamation(digits, [list(range(9)), [9]])
    with pytest.raises(ValueError, match="got 11"): Amalgamation.split(digits, 11)
    am = Amalgamation.split(digits, 2, seed=3)
    with pytest.raises(ValueError, match="teacher 0 has 4 outputs but its class group has 5 classes"): check_expert_outputs([4, 5], am.tasks)
    u = union_logits([torch.zeros(1, 5), torch.ones(1, 5)], am.tasks)
    assert u[0, am.tasks[1]].eq(1).all() and u[0, am.tasks[0]].eq(0).all()


@pytest.mark.parametrize("name,settings", [("ka", {}), ("ka", {"gamma": 1.0}), ("ka", {"only": 1}), ("cfl", {"hidden": 8}),
                                           ("cfl", {"hidden": 8, "space": "direct"}), ("cfl", {"hidden": 8, "space": "random"})])
def test_amalgamating_methods_train_and_report_per_task_accuracy(name, settings):
    ds = load_dataset("digits")
    am = Amalgamation.split(ds, 2, seed=0)
    torch.manual_seed(0)
    experts = [create_model(a, len(t), 1) for a, t in zip(("cnn_small", "resnet8"), am.tasks)]
    d = Distiller(create_model("cnn_tiny", 10, 1), make_method(name, **settings), ds, teachers=experts,
                  cfg=TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=1e-3), progress=False, tasks=am.tasks)
    h = d.fit()[-1]
    assert math.isfinite(h["train_loss"]) and len(h["test_tasks"]) == 2 and all(0 <= a <= 100 for a in h["test_tasks"])


def test_cli_amalgamates_experts(tmp_path, cli_data):
    res = quick_run(tmp_path, cli_data, "--experts", "2", methods="ka,cfl")
    for m in ("ka", "cfl"):
        run = res["runs"][f"{m}/0"]
        assert run["status"] == "ok" and len(run["tasks"]) == 2 and all(0 <= a <= 100 for a in run["tasks"]), run
    assert sorted(sum((t["classes"] for t in res["teachers"]), [])) == list(range(10))
