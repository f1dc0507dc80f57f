"""A chapter a reader can run: one switch at its top (`FULL`, or `KDBOOK_FULL=1`) sizes every live cell through
`RUN(test, quick, full)`, each chapter states how long "Run all" takes in both settings (under its title, in the README
and on the index page), and one heavy chapter's quick "Run all" is timed the way a reader runs it."""
import ast, json, os, re, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
CHAPTERS = sorted(p.stem for p in NBS.glob("[0-9][0-9]_*.ipynb"))
RUN_ALL = re.compile(r"^\*\*Run all\*\* on a 2-core CPU: quick setting about (\d+) min, full setting about (\d+) min\.$",
                     re.M)
SWITCH = ("FULL = False", "RUN = book_setting(FULL)")
QUICK_LIMIT_MIN = 5   # a reader's Run all in the quick setting, on a 2-core CPU
TIMED = "05_explain"  # the chapter timed below: it trains teachers and students and explains them


def cells(stem: str) -> list:
    return json.loads((NBS / f"{stem}.ipynb").read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def stated_times(stem: str) -> tuple:
    "The (quick, full) minutes under the chapter's title."
    title = source(cells(stem)[0])
    m = RUN_ALL.search(title)
    assert m, f"{stem}: the title cell has no line '**Run all** on a 2-core CPU: quick setting about N min, full " \
              f"setting about M min.'"
    return int(m[1]), int(m[2])


@pytest.mark.parametrize("stem", CHAPTERS)
def test_each_chapter_states_its_run_all_times(stem):
    quick, full = stated_times(stem)
    assert 0 < quick <= QUICK_LIMIT_MIN, f"{stem}: quick setting {quick} min, allowed 1 to {QUICK_LIMIT_MIN}"
    assert quick <= full, f"{stem}: the quick setting ({quick} min) takes longer than the full one ({full} min)"


@pytest.mark.parametrize("stem", CHAPTERS)
def test_one_switch_sizes_every_live_cell(stem):
    code = [(i, source(c)) for i, c in enumerate(cells(stem)) if c["cell_type"] == "code"]
    sized = [i for i, s in code if any(_sizes_by_in_test(n) for n in ast.walk(_parse(s)))]
    assert not sized, f"{stem}: cells {sized} choose a size by IN_TEST; use RUN(test=..., quick=..., full=...)"
    for i, s in code:
        assert not re.search(r"^\s*IN_TEST\s*=(?!\s*RUN\.name == \"test\")", s, re.M), \
            f"{stem}, cell {i}: IN_TEST must come from the switch (IN_TEST = RUN.name == \"test\")"
    users = [i for i, s in code if re.search(r"\bRUN[(.]", s)]
    if not users: return   # nothing live to size (the chapter's time is the same in both settings)
    switch = [i for i, s in code if s.lstrip().startswith(SWITCH[0]) and SWITCH[1] in s]
    assert len(switch) == 1, f"{stem}: {len(switch)} switch cells (one shown cell: {SWITCH[0]!r} ... {SWITCH[1]!r})"
    assert switch[0] <= min(users), f"{stem}: cell {min(users)} uses RUN before the switch (cell {switch[0]})"
    assert not source(cells(stem)[switch[0]]).startswith("#|"), f"{stem}: the switch cell must be shown"
    calls = [n for _, s in code for n in ast.walk(_parse(s)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "RUN"]
    for c in calls:
        assert sorted(k.arg for k in c.keywords) == ["full", "quick", "test"] and not c.args, \
            f"{stem}: {ast.unparse(c)[:120]}: RUN takes test=, quick= and full="
    smaller = [c for c in calls if ast.dump(_kw(c, "quick")) != ast.dump(_kw(c, "full"))]
    assert smaller, f"{stem}: every RUN(...) gives the quick setting the full one's value: the switch changes nothing"


def _parse(src: str) -> ast.AST:
    "A cell's source as Python (IPython's `%` and `!` lines left out)."
    return ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))


def _sizes_by_in_test(node: ast.AST) -> bool:
    "`a if IN_TEST else b` (or `if not IN_TEST`), unless a branch is `type(x).__name__` (a widget shown by name under test)."
    if not isinstance(node, ast.IfExp): return False
    t = node.test.operand if isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not) else node.test
    if not (isinstance(t, ast.Name) and t.id == "IN_TEST"): return False
    return not any(isinstance(b, ast.Attribute) and b.attr == "__name__" for b in (node.body, node.orelse))


def _kw(call: ast.Call, name: str) -> ast.AST:
    return next(k.value for k in call.keywords if k.arg == name)


def table_rows(text: str, stem: str, pattern: str) -> list:
    return [l for l in text.splitlines() if l.startswith("|") and re.search(pattern.format(stem=re.escape(stem)), l)]


@pytest.mark.parametrize("stem", CHAPTERS)
def test_readme_and_index_give_the_same_times(stem):
    quick, full = stated_times(stem)
    want = f"{quick} / {full} min"
    readme = table_rows((ROOT / "README.md").read_text(), stem, r"^\| `{stem}` \|")
    assert len(readme) == 1 and want in readme[0], f"README's row for {stem} should give '{want}': {readme}"
    index = "".join(source(c) for c in json.loads((NBS / "index.ipynb").read_text())["cells"])
    rows = table_rows(index, stem, r"\({stem}\.ipynb\)")
    assert len(rows) == 1, f"index.ipynb: {len(rows)} table rows link {stem}.ipynb"
    assert want in rows[0], f"index.ipynb's row for {stem} should give '{want}': {rows[0]}"


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory):
    "The timed chapter's Run all as a reader runs it: nbconvert, a fresh kernel, the quick setting (no IN_TEST)."
    pytest.importorskip("nbconvert"); pytest.importorskip("ipykernel")
    env = {k: v for k, v in os.environ.items() if k not in ("IN_TEST", "KDBOOK_FULL")}
    out = tmp_path_factory.mktemp("run_all") / f"{TIMED}.ipynb"
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", f"{TIMED}.ipynb",
           "--output", str(out), f"--ExecutePreprocessor.timeout={60 * QUICK_LIMIT_MIN * 2}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=NBS, env=env, capture_output=True, text=True, timeout=60 * QUICK_LIMIT_MIN * 3)
    return r, time.perf_counter() - t0, out, os.getloadavg()[0]


def test_a_heavy_chapter_runs_all_within_its_stated_time(timed_run):
    r, seconds, out, load = timed_run
    assert r.returncode == 0, f"Run all of {TIMED} failed:\n{r.stderr[-3000:]}"
    quick, _ = stated_times(TIMED)
    print(f"{TIMED}: Run all in the quick setting took {seconds:.0f} s (stated: about {quick} min; load {load:.1f})")
    assert seconds <= 60 * QUICK_LIMIT_MIN, f"{TIMED}: Run all took {seconds:.0f} s, over {QUICK_LIMIT_MIN} min"
    text = "".join("".join(o.get("text", "")) for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", []))
    assert "quick setting" in text and "Not the numbers the text discusses" in text, \
        f"{TIMED}'s quick run does not say that its numbers are the quick setting's"


@pytest.mark.parametrize("stem", CHAPTERS)
def test_slow_and_gpu_cells_pass_over_in_a_readers_run_all(stem):
    """A reader's Run all runs `#| slow` and `#| gpu` cells too (only the test runner skips them): each is guarded,
    `if RUN.only_full(...)` (the full setting only) or `if gpu_here(...)` (a CUDA GPU only), and says why it did not run."""
    for i, c in enumerate(cells(stem)):
        if c["cell_type"] != "code": continue
        lines = source(c).splitlines()
        opts = [l.strip() for l in lines if l.startswith("#|")]
        body = [l for l in lines if not l.startswith("#|") and l.strip()]
        if "#| slow" in opts:
            assert body and body[0].startswith("if RUN.only_full("), f"{stem}, cell {i}: a slow cell not guarded"
        if "#| gpu" in opts:
            assert body and body[0].startswith("if gpu_here("), f"{stem}, cell {i}: a GPU cell not guarded"
