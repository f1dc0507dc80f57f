"""The book in JupyterLab, in a real browser: JupyterLab on loopback, headless Chromium driven over the DevTools protocol
(chapter 10's cells run by JupyterLab's own commands, a slider of its widget moved with the keyboard).

JupyterLab serves a temporary copy of the chapter and the fixture it reads (so that its autosave cannot touch
`nbs/`); the kernel imports the installed `kdbook`. `--LabApp.expose_app_in_browser` puts the application object at `window.jupyterapp`, which is how
the test opens the notebook, runs cells and reads their outputs."""
import os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

from conftest import chromium, require_system
from test_pages import Chrome

ROOT = Path(__file__).resolve().parents[1]
CHAPTER, WIDGET_CELL = "10_aekd.ipynb", "alignment_widget() if not IN_TEST"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    "JupyterLab on a free loopback port, serving a folder with a copy of the chapter; yields its URL and a Chromium tab."
    exe = chromium()
    require_system(exe is not None, "Chromium")
    book = tmp_path / "book"     # the chapter and the fixture it reads (../tests/fixtures), in the repository's layout
    (book / "nbs").mkdir(parents=True)
    shutil.copy(ROOT / "nbs" / CHAPTER, book / "nbs" / CHAPTER)
    shutil.copytree(ROOT / "tests" / "fixtures", book / "tests" / "fixtures")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "IN_TEST"}   # the widget cell shows the widget only outside tests
    env.update(JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--IdentityProvider.token=", "--ServerApp.password=", "--LabApp.expose_app_in_browser=True",
         f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
         f"--ServerApp.root_dir={book}"],
        stdout=open(tmp_path / "lab.log", "w"), stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
    browser = Chrome(exe, tmp_path)
    try: yield url, browser
    finally:
        browser.close()
        proc.terminate()
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: proc.kill()


def wait_for(browser, expr: str, timeout: float, what: str):
    "Poll the page until the JavaScript `expr` is truthy; its value."
    end = time.time() + timeout
    while time.time() < end:
        if v := browser.js(expr): return v
        browser.pump(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def run_and_wait(browser, command: str, timeout: float):
    "Run a notebook command (not awaited: its promise ends with the cells) and wait until no cell runs and the kernel is idle."
    browser.js(f"void jupyterapp.commands.execute('{command}')")
    browser.pump(0.5)
    wait_for(browser, "__nb.sessionContext.session.kernel.status === 'idle' && "
                      "!__nb.content.widgets.some(c => c.model.type === 'code' && c.model.executionState === 'running')",
             timeout, f"'{command}' to finish")


def cell_errors(browser) -> list:
    "The error outputs of every code cell of the open notebook, as 'name: value'."
    return browser.js("__nb.content.widgets.filter(c => c.model.type === 'code').map(c => c.model.toJSON().outputs"
                      ".filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)).flat()")


def test_chapter_10_widget_runs_and_its_slider_moves_the_figure(lab):
    url, b = lab
    b.open(f"{url}/lab", timeout=90)
    wait_for(b, "!!window.jupyterapp", 90, "JupyterLab's application")
    b.js("jupyterapp.restored", await_promise=True)
    kernel = b.js(f"""(async () => {{
        const w = await jupyterapp.commands.execute('docmanager:open', {{path: 'nbs/{CHAPTER}', factory: 'Notebook'}});
        window.__nb = w; await w.context.ready; await w.sessionContext.ready; jupyterapp.shell.activateById(w.id);
        return w.sessionContext.session.kernel.name; }})()""", await_promise=True)
    assert kernel == "python3"
    idx = b.js(f"__nb.content.widgets.findIndex(c => c.model.sharedModel.getSource().includes('{WIDGET_CELL}'))")
    assert idx > 0, "chapter 10 no longer has its alignment widget cell"
    b.js(f"__nb.content.activeCellIndex = {idx}")
    run_and_wait(b, "notebook:run-all-above", 300)           # the definitions the widget needs
    assert cell_errors(b) == [], cell_errors(b)
    b.js(f"__nb.content.activeCellIndex = {idx}")
    run_and_wait(b, "notebook:run-cell", 120)                # the widget itself
    cell = f"__nb.content.widgets[{idx}].node"
    b.js(f"{cell}.scrollIntoView()")
    title = wait_for(b, f"{cell}.querySelectorAll('.noUi-handle').length === 3 && ({cell}.querySelector('.gtitle') || {{}}).textContent",
                     60, "the widget's three sliders and its figure")
    assert title.startswith("α* = (")
    readout = b.js(f"{cell}.querySelector('.widget-readout').textContent")
    b.js(f"{cell}.querySelector('.noUi-handle').focus()")        # the C slider, moved to its end with the keyboard
    for kind in ("rawKeyDown", "keyUp"):
        b.call("Input.dispatchKeyEvent", type=kind, key="End", code="End", windowsVirtualKeyCode=35, nativeVirtualKeyCode=35)
    moved = wait_for(b, f"({cell}.querySelector('.gtitle') || {{}}).textContent !== {title!r} && {cell}.querySelector('.gtitle').textContent",
                     60, "the figure to follow the slider")
    assert b.js(f"{cell}.querySelector('.widget-readout').textContent") == "1.00" != readout
    assert moved.startswith("α* = (") and moved != title
    assert cell_errors(b) == [], cell_errors(b)
    uncaught = [e for e in b.errors() if e.startswith("uncaught")]
    assert not uncaught, uncaught
