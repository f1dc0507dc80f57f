"Execute a notebook in place with execnb (as nbdev's test runner does, but not under IN_TEST), in the full setting (KDBOOK_FULL=1: the outputs a page stores; --quick for the quick one): `#| slow` and `#| gpu` cells are skipped, and so are the cells whose ids follow --skip, keeping their stored outputs. Usage: python tools/run_notebook.py nbs/10_aekd.ipynb [--skip ID ...] [--quick]; then nbdev-clean."
import os, re, sys, argparse
# plotly figures that draw on the site: each figure loads plotly.js itself (from the CDN). The default under execnb,
# "notebook", leaves that to a one-off output embedding plotly.js (megabytes, stripped below), and a page without it
# shows blank figures ("Plotly is not defined"; tests/test_pages.py checks the pages in a browser)
os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype+notebook_connected")
from nbdev.process import read_nb, write_nb
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from strip_figure_mathjax import strip_outputs
from static_widgets import static_outputs
from execnb.shell import CaptureShell
p = argparse.ArgumentParser(); p.add_argument("nb"); p.add_argument("--skip", nargs="*", default=[])
p.add_argument("--quick", action="store_true", help="the quick setting (a reader's Run all), not the stored full one")
a = p.parse_args()
if os.environ.get("IN_TEST"): sys.exit("IN_TEST is set: the test setting would be stored; unset it")
os.environ["KDBOOK_FULL"] = "0" if a.quick else "1"   # read by each chapter's book_setting(FULL)
path = os.path.abspath(a.nb); os.chdir(os.path.dirname(path))
nb = read_nb(path)
sh = CaptureShell(path=os.path.dirname(path))
skip = set(a.skip)
flagged = lambda c: any(l.strip() in ("#| slow", "#| gpu") for l in c.source.splitlines()[:3])   # as under test: not run here
sh.run_all(nb, exc_stop=True, preproc=lambda c: c.get("id") in skip or flagged(c))
nb.metadata.pop("widgets", None)
for c in nb.cells:   # execnb records `fig.show()`'s None as an empty result: drop it
    if c.get("outputs"): c.outputs = [o for o in c.outputs if not (o.get("output_type") == "execute_result" and not o.get("data"))]
    # the "notebook" renderer's one-off injection of plotly.js itself (megabytes), if PLOTLY_RENDERER asks for it
    if c.get("outputs"): c.outputs = [o for o in c.outputs if "* plotly.js v" not in "".join(o.get("data", {}).get("text/html", ""))[:2000]]
    if c.get("outputs"): strip_outputs(c.outputs)   # the figures' own MathJax: the page has one
    if c.get("outputs"): c.outputs = static_outputs(c.outputs)[0]   # widget views saved without state (tools/static_widgets.py)
    # terminal control sequences alone (a progress bar's line clears): nothing to show
    if c.get("outputs"): c.outputs = [o for o in c.outputs if not (o.get("output_type") == "stream" and not re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", "".join(o.get("text", ""))).strip())]
write_nb(nb, path)
print("ok", path)
