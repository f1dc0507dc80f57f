"The site's first step: nbdev's docs processing (what `nbdev-docs` runs before Quarto in the deploy workflow) processes every page of the sidebar."
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sidebar_pages() -> list:
    return re.findall(r"-\s+(\S+\.ipynb)", (ROOT / "nbs" / "sidebar.yml").read_text())


def test_nbdev_processes_every_page_without_running_the_experiments(nbdev_proc):
    """nbdev executes, at docs time, every cell that holds an export, a show_doc or *any import*. A cell that mixes an
    import with an experiment would train networks (or fail on state it does not have) while the site builds; such
    imports belong in the page's `#| hide` setup cell. Every sidebar page must come out of the processing."""
    tmp_path, returncode, log = nbdev_proc   # conftest runs `nbdev-proc-nbs` once per session (test_pages.py uses it too)
    assert returncode == 0 and "Error in notebook" not in log, log[-6000:]
    done = {p.name for p in (tmp_path / "_proc").rglob("*.ipynb")}
    missing = [p for p in _sidebar_pages() if p not in done]
    assert not missing, f"not processed: {missing}\n{log[-4000:]}"
    # the cells nbdev warns about (imports mixed with other code) must be the pages' `#| hide` setup cells
    mixed = re.findall(r"Found cells containing imports and other code\. See FAQ\.\n---\n(.*?)\n---", log, flags=re.S)
    assert all(m.lstrip().startswith("#| hide") for m in mixed), [m[:200] for m in mixed if not m.lstrip().startswith("#| hide")]
