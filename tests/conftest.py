"""Shared test helpers.

Some tests need what only a system package gives (Debian's `dataset-fashion-mnist`, Chromium). On a
machine with only Python they are skipped with the reason; `.ci/run` installs the packages and sets
`KDBOOK_REQUIRE_SYSTEM=1`, and then a missing package fails the test instead of skipping it.
"""
import json, os, shutil
from pathlib import Path

import pytest

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def chromium() -> str | None:
    "The path of a headless-capable Chromium, or None."
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def require_system(present: bool, what: str) -> None:
    "Skip (or, under `KDBOOK_REQUIRE_SYSTEM`, fail) the calling test when `what` is not on this machine."
    if present: return
    if os.environ.get("KDBOOK_REQUIRE_SYSTEM"):
        pytest.fail(f"{what} is missing, but KDBOOK_REQUIRE_SYSTEM is set (.ci/run installs it)")
    pytest.skip(f"{what} is not installed on this machine (.ci/run installs it)")


def quick_run(tmp_path, data: str, *flags: str, methods: str) -> dict:
    "`kdbook run` on `data` with 1 epoch, 1 teacher epoch and 1 seed into a fresh folder; asserts it exits 0 and returns results.json."
    from kdbook import cli
    out = tmp_path / data
    code = cli.main(["run", "--data", data, "--methods", methods, *flags, "--epochs", "1", "--teacher-epochs", "1",
                     "--seeds", "1", "--out", str(out)])
    assert code == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="session")
def nbdev_proc(tmp_path_factory):
    """nbdev's docs processing (`nbdev-proc-nbs`, what `nbdev-docs` runs before Quarto) on a temp copy of the repo, once
    per test session: `(folder, returncode, log)`, with the processed pages under `folder / "_proc"`."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("nbdev_proc")
    for name in ("pyproject.toml", "README.md"): shutil.copy(root / name, tmp / name)
    shutil.copytree(root / "nbs", tmp / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(root / "kdbook", tmp / "kdbook", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(["nbdev-proc-nbs"], cwd=tmp, capture_output=True, text=True, timeout=900)
    return tmp, r.returncode, r.stdout + r.stderr


@pytest.fixture(params=["digits", "fashion-mnist"])
def cli_data(request, tmp_path, monkeypatch) -> str:
    "A dataset for a `kdbook run` test with a fresh cache: the embedded digits, and Fashion-MNIST where Debian's package is."
    if request.param == "fashion-mnist": require_system(FASHION_MNIST.exists(), "Debian's dataset-fashion-mnist")
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    return request.param


@pytest.fixture
def float64():
    "torch's default dtype float64 for one test (formula checks against float64 references), restored after."
    import torch
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
