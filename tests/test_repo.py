"""House rules for the book's sources: small clean notebooks, every chapter on the site."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_small_and_carries_no_widget_state(nb):
    assert nb.stat().st_size < 2_000_000, f"{nb.name} is {nb.stat().st_size / 1e6:.1f} MB: clear heavy outputs"
    meta = json.loads(nb.read_text())["metadata"]
    assert "widgets" not in meta, f"{nb.name} embeds saved widget state (megabytes of JS): save without it"


def test_every_notebook_is_in_the_sidebar():
    sidebar = (ROOT / "nbs" / "sidebar.yml").read_text()
    missing = [p.name for p in NOTEBOOKS if p.name not in sidebar]
    assert not missing, f"add to nbs/sidebar.yml: {missing}"


def test_no_settings_ini():
    assert not (ROOT / "settings.ini").exists(), "nbdev 3 reads pyproject.toml; settings.ini must not exist"
