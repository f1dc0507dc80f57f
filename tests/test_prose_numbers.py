"""Prose repeats only printed numbers: every number with a decimal point or a percent sign in a notebook's
markdown must appear in a stored output of the same notebook (a printout, a table or figure it displays, the
paper's numbers it prints).

The rules, so that a failure is easy to read and to fix:
- Printed means the text of a stored output (a printout, a displayed table) or a point of a stored figure
  (its values, error bars and hover text), which a reader sees on hovering.
- A quoted number matches a printed one when the printed number, rounded to the quoted precision, gives it
  (prose "1.8×" matches a printed "1.78x"; "1.78" does not match a printed "1.8"). Signs are ignored
  (prose writes −0.7 for a printed -0.70). A percentage also matches a printed fraction (60% and 0.6).
- Not read as quoted numbers: LaTeX math (`$...$`, `$$...$$`: the equations' constants), code (inline and
  fenced: settings and commands), link targets, section numbers (§4.1), version numbers (torch 2.14,
  2.14.1), and bounds stated as targets or thresholds (after ≤, ≥, <, >, "at most", "at least", "target").
- ALLOWED below: a few constants the prose may name without a printout (hyper-parameters of the papers'
  recipes), each with its reason.
"""
import json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))

ALLOWED = {
    "0.1": "a loss weight or a learning-rate factor of a recipe (γ = 0.1, ÷10)",
    "0.9": "SGD momentum and the KD weight α = 0.9 of RepDistiller's recipe",
    "0.05": "the CIFAR recipes' learning rate",
    "0.01": "a learning rate of the CIFAR recipes (MobileNetV2 and ShuffleNet students)",
    "62.5": "the book's learning-rate milestones: 62.5 / 75 / 87.5 % of the run",
    "87.5": "the book's learning-rate milestones: 62.5 / 75 / 87.5 % of the run",
}

_SKIP = re.compile(r"\$\$.*?\$\$|\$[^$\n]*?\$|```.*?```|`[^`\n]*`|\]\([^)]*\)|https?://\S+", re.S)
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?:e([-+]?\d+))?(\.\d+)*(\s?%)?", re.I)
_BOUND = re.compile(r"(?:[≤≥<>]|\bat most|\bat least|\btargets?:?|§|\b(?:torch|python|numpy|scipy|plotly)"
                    r"|\bv)\s*[+±]?\s*$", re.I)
_PRINTED = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.I)


def quoted_numbers(markdown: str) -> list:
    "(text, value, tolerance, is_percent) for each number the prose quotes with a decimal point or a percent sign."
    text = _SKIP.sub(" ", markdown)
    out = []
    for m in _NUMBER.finditer(text):
        whole, frac, exp, more, pct = m.groups()
        if more or not (frac or pct): continue                     # a version (2.14.1), or a plain integer
        if _BOUND.search(text[max(0, m.start() - 12):m.start()]): continue
        decimals = len(frac) - 1 if frac else 0
        scale = 10.0 ** int(exp) if exp else 1.0
        value = float(whole.replace(",", "") + (frac or "")) * scale
        out.append((m.group(0).strip(), value, 0.5 * 10.0 ** -decimals * scale * (1 + 1e-9), bool(pct)))
    return out


def printed_numbers(nb: dict) -> list:
    "Every number in the text of the notebook's stored outputs (streams, plain text, Markdown tables)."
    vals = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            texts = ["".join(out["text"])] if "text" in out else []
            texts += ["".join(v) if isinstance(v, list) else v
                      for k, v in out.get("data", {}).items() if k in ("text/plain", "text/markdown")]
            for t in texts: vals += [abs(float(x)) for x in _PRINTED.findall(t.replace(",", ""))]
            for trace in out.get("data", {}).get("application/vnd.plotly.v1+json", {}).get("data", []):
                vals += _plotted(trace)
    return vals


def _plotted(obj) -> list:
    "The numbers a figure's trace shows (its points, error bars, hover and label text), not its encoded arrays."
    if isinstance(obj, bool): return []
    if isinstance(obj, (int, float)): return [abs(float(obj))]
    if isinstance(obj, str): return [abs(float(x)) for x in _PRINTED.findall(obj.replace(",", ""))]
    if isinstance(obj, list): return [v for x in obj for v in _plotted(x)]
    if isinstance(obj, dict): return [v for k, x in obj.items() if k not in ("bdata", "dtype", "shape") for v in _plotted(x)]
    return []


def unprinted(nb: dict) -> list:
    "The quoted numbers of the notebook's markdown that no output prints, with their cell and context."
    vals = sorted(set(printed_numbers(nb)))
    bad = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown": continue
        src = "".join(cell["source"])
        for text, value, tol, pct in quoted_numbers(src):
            if text.rstrip("% ") in ALLOWED: continue
            targets = [value, value / 100] if pct else [value]
            if any(abs(v - t) <= tol * (t / value if value else 1) for v in vals for t in targets): continue
            at = src.find(text)
            bad.append(f"cell {i}: {text!r} in ...{src[max(0, at - 70):at + 30]!r}...")
    return bad


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_prose_quotes_only_printed_numbers(nb):
    bad = unprinted(json.loads(nb.read_text()))
    assert not bad, f"{nb.name}: numbers in the prose that no output of the page prints:\n" + "\n".join(bad)


def _nb(markdown: str, printed: str) -> dict:
    return {"cells": [{"cell_type": "markdown", "source": [markdown]},
                      {"cell_type": "code", "source": [""], "outputs": [{"output_type": "stream", "text": [printed]}]}]}


@pytest.mark.parametrize("markdown,printed,ok", [
    ("MoE-KD is 1.78× KA's step", "MERL only 1.78x", True),
    ("about 1.8× KA's step", "MERL only 1.78x", True),                    # rounded to the quoted precision
    ("3.4× / 1.03×", "MERL only 1.78x, CAL only 0.60x", False),           # an older run's numbers
    ("1.78×", "1.8x", False),                                             # more precise than the printout
    ("−0.67 points", "-0.67", True),
    ("60% of the labels", "noise 0.6", True),
    ("68% on the clean test set", "68.2%", True),
    ("a margin of 2.53", "77.12 ± 0.77", False),
    ("$p = 0.9$ and `lr=0.37`, torch 2.14, §4.1", "", True),             # math, code, versions, sections
    ("at most 1.15 at both sizes", "", True),                             # a target
    ("0.1 on the cross-entropy", "", True),                               # an allowed constant
    ("a relative 1.1e-3", "differs by 1.1e-03", True),
    ("a relative 1.1e-3", "differs by 1.4e-03", False),
])
def test_the_rule(markdown, printed, ok):
    assert (not unprinted(_nb(markdown, printed))) == ok, unprinted(_nb(markdown, printed))
