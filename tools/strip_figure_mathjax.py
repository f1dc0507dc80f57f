"""Remove the MathJax <script src=...> that plotly's notebook renderers put into every figure's HTML output. The book's
pages load MathJax 3 themselves (Quarto's); a second copy per figure throws on the page (tests/test_pages.py).
Also give plotly's module import of its CDN script the `.js` it lacks (`import "https://cdn.plot.ly/plotly-4.1.1.min"`,
written by the `notebook_connected` renderer): without it the CDN answers 403 and the live page logs an error.
Usage: python tools/strip_figure_mathjax.py nbs/*.ipynb  (tools/run_notebook.py applies it to the notebooks it runs)."""
import json, re, sys

FIGURE_MATHJAX = re.compile(r"<script[^>]*\bsrc=[\"'][^\"']*mathjax[^\"']*[\"'][^>]*>\s*</script>", flags=re.I)
PLOTLY_NO_JS = re.compile(r"(https://cdn\.plot\.ly/plotly-[\d.]+\.min)([\"'])")   # a script address without .js

def strip_outputs(outputs) -> int:
    "Strip in place; the number of outputs changed."
    n = 0
    for o in outputs:
        data = o.get("data", {})
        html = data.get("text/html")
        if html is None: continue
        text = "".join(html) if isinstance(html, list) else html
        new = PLOTLY_NO_JS.sub(r"\1.js\2", FIGURE_MATHJAX.sub("", text))
        if new != text: data["text/html"], n = new.splitlines(keepends=True) if isinstance(html, list) else new, n + 1
    return n

if __name__ == "__main__":
    for p in sys.argv[1:]:
        nb = json.load(open(p))
        n = sum(strip_outputs(c.get("outputs", [])) for c in nb["cells"])
        if n:
            with open(p, "w") as f: json.dump(nb, f, indent=1, ensure_ascii=False); f.write("\n")
        print(f"{p}: {n} figure output(s) stripped or given .js")
