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


# ------------------------------------------------------------------------------------------------ the house's floors
import ast, re, tomllib

PACKAGE = ROOT / "kdbook"
# Each module imports only from lower floors, or from its own floor's earlier chapters (the methods build on each
# other: AE-KD on the baselines, MEC on CFL). Written down once, here; DESIGN's order with the study below the methods,
# since a method may train its experts with the study's teacher zoo and the study names no method.
FLOORS = [
    {"core", "data"},                                      # tensors, losses, datasets: nothing of the book
    {"models", "dist"},                                    # the zoo; process groups and collectives
    {"learner"},                                           # the engine: Method, registry, Distiller, checkpoints
    {"study", "explain", "ddp_checks", "teacher_cache"},   # teacher zoo + run_study; attributions; DDP checks; logits cache
    {"baselines", "aekd", "moekd", "cfl", "mec", "mmkd"},  # the methods, one chapter each
    {"bench"},                                             # speed ratios over everything
    {"cli"},                                               # the `kdbook` command
]
FLOOR = {m: i for i, ms in enumerate(FLOORS) for m in ms}
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))


def chapter(module: str) -> str:
    "The notebook a module is exported from (nbdev's header names it)."
    return re.search(r"File to edit: \.\./nbs/(\w+)\.ipynb", (PACKAGE / f"{module}.py").read_text()).group(1)


def kdbook_imports(source: str, module: str) -> set:
    "Every kdbook module `source` imports, at module level or inside a function."
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kdbook.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module: out.add(node.module.split(".")[0])
            elif node.level == 1: out |= {a.name for a in node.names}
            elif (node.module or "").startswith("kdbook."): out.add(node.module.split(".")[1])
            elif node.module == "kdbook": out |= {a.name for a in node.names}
    return {m for m in out if m in MODULES and m != module}


def import_graph(sources: dict) -> dict:
    return {m: kdbook_imports(s, m) for m, s in sources.items()}


def upward_imports(graph: dict) -> list:
    "Edges that run upward: to a higher floor, or to a later chapter of the same floor."
    return [(a, b) for a, bs in graph.items() for b in sorted(bs)
            if FLOOR[b] > FLOOR[a] or (FLOOR[b] == FLOOR[a] and chapter(b) >= chapter(a))]


def cycle(graph: dict) -> list:
    "One import cycle as a list of modules, or [] (depth-first search)."
    state, stack = {}, []
    def visit(m):
        state[m] = "open"; stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open": return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)): return found
        state[m] = "done"; stack.pop()
        return []
    for m in sorted(graph):
        if m not in state and (found := visit(m)): return found
    return []


def sources() -> dict:
    return {m: (PACKAGE / f"{m}.py").read_text() for m in MODULES}


def test_every_module_has_a_floor():
    assert set(MODULES) == set(FLOOR), f"modules without a floor: {set(MODULES) - set(FLOOR)}; floors naming no module: {set(FLOOR) - set(MODULES)}"


def test_imports_run_downward_and_never_in_a_circle():
    graph = import_graph(sources())
    assert not cycle(graph), f"import cycle: {' -> '.join(cycle(graph))}"
    assert not upward_imports(graph), f"imports that run upward (module -> what it imports): {upward_imports(graph)}"


def test_the_floor_check_sees_a_function_level_import_of_a_chapter():
    "The check itself: a function-level import of a method chapter added to kdbook.dist is caught, and so is a circle."
    src = sources()
    src["dist"] += "\n\ndef _harness():\n    import kdbook.baselines, kdbook.aekd\n    from kdbook.learner import Distiller\n"
    graph = import_graph(src)
    assert {("dist", "aekd"), ("dist", "baselines"), ("dist", "learner")} <= set(upward_imports(graph))
    assert cycle(graph), "dist -> learner -> dist is a circle"


# ------------------------------------------------------------------------------------------------ methods in one place
def entry_point_modules() -> set:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["kdbook.methods"]
    return {v.split(".")[1] for v in table.values()}


def test_every_module_that_registers_a_method_is_an_entry_point_and_only_those():
    registering = {m for m, s in sources().items() if re.search(r"^@register_method|^register_method\(", s, re.M)}
    registering.discard("learner")   # the registry itself registers the base `Method` ("ce")
    assert registering == entry_point_modules(), (
        f"pyproject.toml [project.entry-points.'kdbook.methods'] must list exactly the modules that register methods: "
        f"missing {registering - entry_point_modules()}, not registering {entry_point_modules() - registering}")


def test_no_other_file_lists_the_method_chapters():
    "The registry loads the chapters from the entry points; no module, test or tool imports three of them in one line."
    chapters = entry_point_modules()
    files = [*PACKAGE.glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "tools").glob("*.py")]
    offenders = []
    for p in files:
        if p.name == "_modidx.py": continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                named = {a.name.split(".")[1] for a in node.names if a.name.startswith("kdbook.")} & chapters
                if len(named) >= 3: offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"these lines list the method chapters (the registry finds them): {offenders}"


# ------------------------------------------------------------------------------------------------ short functions
def test_no_function_is_longer_than_60_lines():
    long = [(m, n.name, n.end_lineno - n.lineno + 1) for m, s in sources().items() for n in ast.walk(ast.parse(s))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, f"functions over 60 lines (module, name, lines): {long}"


# ------------------------------------------------------------------------------------------------ whole docstrings
def _is_str(node) -> bool: return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)

def test_no_docstring_is_cut_by_a_second_string_statement():
    "Two string lines in a row open a body: the second is a statement of its own, so `help()` and the docs cut the text."
    cut = [(m, n.name, n.lineno) for m, s in sources().items() for n in ast.walk(ast.parse(s))
           if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and len(n.body) > 1
           and _is_str(n.body[0]) and _is_str(n.body[1])]
    assert not cut, f"docstrings continued in a second string statement (module, name, line): {cut}"
