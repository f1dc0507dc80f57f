"""Run every notebook in nbs/ as one pytest case, through nbdev's notebook runner.

Cells flagged with one of `tst_flags` (pyproject.toml: `slow`, `gpu`) are skipped unless
`KDBOOK_TEST_FLAGS` names them, e.g. on a GPU machine: `KDBOOK_TEST_FLAGS="gpu slow" pytest`.
Each notebook runs in a fresh Python process, as `nbdev-test` does, so one notebook's global
state (torch's default dtype, seeds, threads) cannot leak into another's.
"""
import os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))

RUNNER = """
import sys
from nbdev.config import get_config
from nbdev.test import test_nb
cfg = get_config()
skip = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)
ok, secs = test_nb(sys.argv[1], skip_flags=skip, force_flags=sys.argv[2].split(), basepath=str(cfg.config_path),
                   cell_timeout=cfg.cell_timeout or None)
print(f"{sys.argv[1]}: {'passed' if ok else 'FAILED'} in {secs:.1f}s")
sys.exit(0 if ok else 1)
"""


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'nbs'}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook(nb):
    flags = os.environ.get("KDBOOK_TEST_FLAGS", "")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(nb), flags], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{nb.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
