"""The book speaks of itself alone: no page, README or module mentions how it was made.

A reader has no session, issue tracker entry, lent machine, helper or commit of ours to look up, so
every notebook in nbs/ (markdown, code and the text of stored outputs), README.md and the package's
source are searched for those words. The patterns are narrow on purpose: "issue", "helper" and
"commit" have ordinary technical senses, and only these are allowed (ALLOWED, matched around a hit):

- a public project's issue tracker ("the KD libraries' issue trackers", "GitHub issues", "a known
  plotly issue"): a place a reader can visit;
- a path in public code that has a `helper/` folder (MMKD's `helper/meta_optimizer.py`).
"""
import json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
MODULES = sorted((ROOT / "kdbook").glob("*.py"))

FORBIDDEN = {
    "session": r"\bsessions?\b",
    "issue": r"\bissues?\b",
    "lent, lending": r"\b(?:lent|lend|lends|lending|lender|loan(?:ed)?)\b",
    "commit": r"\bcommit(?:s|ted)?\b|`[0-9a-f]{7,40}`",
    "helper": r"\bhelpers?\b|\bhelper's\b",
    "this work": r"\bthis work\b",
    "who wrote the page": r"\b(?:wrote|written|writing)\b[^.\n]{0,40}\b(?:this|the) (?:page|section|chapter|book)\b"
                          r"|\b(?:this|the) (?:page|section|chapter)\b[^.\n]{0,30}\b(?:was|were) (?:written|made)\b",
    "the machines of development": r"\bfor development\b|\bdev(?:elopment)? machines?\b",
    "engineers, branches of work": r"\bengineers?\b|\bworktrees?\b|\bpull requests?\b|\bthe brief\b",
}
ALLOWED = [
    r"issue trackers?",
    r"\bGitHub issues?\b",
    r"\b(?:pytorch|torch|plotly(?:\.py)?|nbdev|quarto|captum|torchdistill|scipy|numpy|jupyter(?:lab)?)\b"
    r"[\w .'-]{0,30}\bissues?\b",
    r"\bhelper/",
]


def _texts_of_notebook(path: Path):
    "(where, text) for every cell's source and every stored output's text (not images)."
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        yield f"cell {i} ({cell['cell_type']})", "".join(cell["source"])
        for out in cell.get("outputs", []):
            if "text" in out: yield f"cell {i} output", "".join(out["text"])
            for mime, data in out.get("data", {}).items():
                if mime in ("text/plain", "text/markdown", "text/html"):
                    yield f"cell {i} output {mime}", "".join(data) if isinstance(data, list) else data
            if out.get("output_type") == "error": yield f"cell {i} error", " ".join(out.get("traceback", []))


def meta_words(text: str) -> list:
    "Each forbidden phrase in `text` that no allowed phrase covers, with a little context."
    allowed = [m.span() for pat in ALLOWED for m in re.finditer(pat, text, re.I)]
    hits = []
    for what, pat in FORBIDDEN.items():
        for m in re.finditer(pat, text, re.I):
            if any(a <= m.start() and m.end() <= b for a, b in allowed): continue
            hits.append(f"{what}: ...{text[max(0, m.start() - 50):m.end() + 50]!r}...")
    return hits


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_speaks_of_itself_alone(nb):
    hits = [f"{where}: {h}" for where, text in _texts_of_notebook(nb) for h in meta_words(text)]
    assert not hits, f"{nb.name} speaks of how it was made:\n" + "\n".join(hits)


def test_readme_and_modules_speak_of_themselves_alone():
    hits = [f"{p.relative_to(ROOT)}: {h}" for p in [ROOT / "README.md", *MODULES] for h in meta_words(p.read_text())]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("text", [
    "No GPU was lent to the session that wrote this page.",
    "no GPU was lent to this work; the recipe is below",
    "The issue's targets were a step at most 1.3x.",
    "The issue asks for both datasets.",
    "it was replaced (commit `150e47d`).",
    "a helper's benchmark of the same solver",
    "The machines lent for development have one GPU.",
    "on a GPU, which this session did not have.",
    "No GPU was there while this section was written.",
])
def test_the_phrases_that_prompted_it_are_caught(text):
    assert meta_words(text), text


@pytest.mark.parametrize("text", [
    "Two failures recur in the KD libraries' issue trackers: metrics averaged wrongly across ranks.",
    "a known plotly.py issue with FigureWidget",
    "The public code's way (`helper/meta_optimizer.py`, `MetaSGD`)",
    "no checkpoint was written (pass out_dir= to keep one)",
    "the loop is written once, here, and a method plugs into it",
])
def test_ordinary_technical_english_passes(text):
    assert not meta_words(text), meta_words(text)
