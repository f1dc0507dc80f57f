"""What a reader sees in the stored pages, checked on the notebooks themselves (no rendering needed): no raw dumps or
stderr boxes, plotly scripts the CDN serves, ternary axes with their own titles, the taught code shown."""
import json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
MAX_LINES, MAX_CHARS = 60, 4000   # one output: a table or a short printout, not a dump
PLOTLY_NO_JS = re.compile(r"https://cdn\.plot\.ly/plotly-[\d.]+\.min[\"']")

def _cells(p: Path) -> list: return json.loads(p.read_text())["cells"]

def _text(o: dict) -> str:
    if o.get("output_type") == "stream": return "".join(o.get("text", ""))
    return "".join(o.get("data", {}).get("text/plain", ""))

def _outputs(p: Path):
    for i, c in enumerate(_cells(p)):
        for o in c.get("outputs", []): yield i, o

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_plotly_scripts_name_a_js_file(nb):
    "plotly's `notebook_connected` renderer imports its CDN script without `.js`: the CDN refuses it (tools/strip_figure_mathjax.py)."
    bad = [i for i, o in _outputs(nb) if PLOTLY_NO_JS.search("".join(o.get("data", {}).get("text/html", "")))]
    assert not bad, f"{nb.name}: cells {bad} load plotly from an address without .js"

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_stderr_box(nb):
    "A warning or log line on stderr shows as a pink box on the page: fix its cause, or keep it out of the stored output."
    bad = [(i, _text(o).strip()[:120]) for i, o in _outputs(nb) if o.get("name") == "stderr" and _text(o).strip()]
    assert not bad, f"{nb.name}: stderr in cells {bad}"

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_output_is_a_raw_dump(nb):
    "Each printed output stays a readable size, and no long dict or list is shown as its raw repr."
    big = [(i, len(t), t.count("\n")) for i, o in _outputs(nb) if (t := _text(o))
           and (len(t) > MAX_CHARS or t.count("\n") > MAX_LINES)]
    raw = [(i, t[:60]) for i, o in _outputs(nb) if o.get("output_type") == "execute_result"
           and (t := _text(o)).startswith(("{'", "[{", "{\"")) and len(t) > 200]
    assert not big and not raw, f"{nb.name}: outputs too long (cell, chars, lines) {big}; raw reprs {raw}"

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_ternary_axes_have_titles(nb):
    "A ternary plot left with plotly's default axis titles shows 'Component A/B/C' over the subplot titles."
    bad = []
    for i, o in _outputs(nb):
        fig = o.get("data", {}).get("application/vnd.plotly.v1+json")
        if not fig: continue
        for k, v in fig.get("layout", {}).items():
            if k.startswith("ternary"):
                missing = [a for a in ("aaxis", "baxis", "caxis") if not (v.get(a, {}).get("title") or {}).get("text")]
                if missing: bad.append((i, k, missing))
    assert not bad, f"{nb.name}: ternary axes without a title (cell, subplot, axes) {bad}"

TAUGHT = {"10_aekd": "class AEKD", "11_moekd": "class MixtureKD", "12_cfl": "class CFL", "13_mec": "class MEC",
          "14_mmkd": "class MMKD"}

@pytest.mark.parametrize("stem", TAUGHT)
def test_method_chapters_show_the_code_they_teach(stem):
    "The chapter's method is defined in a shown cell (`#| exports`), not only in hidden `#| export` ones."
    cells = ["".join(c["source"]) for c in _cells(ROOT / "nbs" / f"{stem}.ipynb") if c["cell_type"] == "code"]
    shown = [s for s in cells if s.lstrip().startswith("#| exports")]
    assert any(TAUGHT[stem] in s for s in shown), f"{stem}: `{TAUGHT[stem]}` is not in a shown (#| exports) cell"
    assert len(shown) >= 3, f"{stem}: only {len(shown)} exported cells are shown"

UNTYPED = re.compile(r":NoneType=|:builtin_function_or_method=|=<factory>")

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_api_docs_show_real_types_and_defaults(nb):
    """show_doc prints a default's type when a parameter has no annotation (`NoneType=None`, `builtin_function_or_method`)
    and `<factory>` for a dataclass factory: annotate, or give a plain default."""
    bad = [(i, m.group(0)) for i, o in _outputs(nb) for m in UNTYPED.finditer(_text(o) + "".join(o.get("data", {}).get("text/markdown", "")))]
    assert not bad, f"{nb.name}: API docs with an inferred type or default (cell, text) {bad}"
