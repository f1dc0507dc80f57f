"""Widget outputs in the stored notebooks, made readable where no kernel runs (the site, a notebook opened unrun).
An ipywidgets view saved without its widget state draws nothing on the site and shows "Error displaying widget" in
JupyterLab until its cell runs again; its state would not help either (sliders with no kernel behind them move
nothing, and a plotly FigureWidget's state carries plotly.js, megabytes). So each stored widget view is
- dropped where its cell also stores a plotly figure (the live training plot: `LivePlotCallback` puts the finished
  figure in place of the widget when training ends, and under a runner both are recorded), and
- otherwise replaced by a one-line note; every such cell has static figures beside it (tests/test_pages.py checks).
Running the cell in Jupyter brings the widget back. Usage: python tools/static_widgets.py nbs/*.ipynb
(tools/run_notebook.py applies it to the notebooks it runs)."""
import json, sys

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
NOTE = ("*An interactive widget is here: run the notebook in Jupyter to move its sliders. "
        "The static figures beside it show the same at fixed settings.*")

def is_note(o) -> bool: return NOTE in "".join(o.get("data", {}).get("text/markdown", ""))

def static_outputs(outputs: list) -> tuple[list, int]:
    "The outputs with each widget view dropped or replaced by the note; the number changed."
    has_fig = any(PLOTLY_MIME in o.get("data", {}) for o in outputs)
    out, n = [], 0
    for o in outputs:
        if WIDGET_MIME not in o.get("data", {}): out.append(o); continue
        n += 1
        if not has_fig: out.append({"output_type": "display_data", "metadata": {},
                                    "data": {"text/markdown": NOTE, "text/plain": "<interactive widget>"}})
    return out, n

if __name__ == "__main__":
    for p in sys.argv[1:]:
        nb = json.load(open(p)); n = 0
        for c in nb["cells"]:
            if c.get("outputs"): c["outputs"], k = static_outputs(c["outputs"]); n += k
        if n:
            with open(p, "w") as f: json.dump(nb, f, indent=1, ensure_ascii=False); f.write("\n")
        print(f"{p}: {n} widget output(s) made static")
