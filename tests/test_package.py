"The package away from the checkout: a wheel and an sdist that twine accepts, and the wheel, installed in a fresh venv, importing every module and running a short study."
import json, os, shutil, subprocess, sys, venv, zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import kdbook

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "kdbook").glob("*.py") if p.stem != "__init__")


def _run(*args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    "A wheel and an sdist built from a copy of the sources (the checkout gets no build/ or egg-info)."
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"): shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "kdbook", src / "kdbook", ignore=shutil.ignore_patterns("__pycache__"))
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return wheels[0], sdists[0]


def test_twine_accepts_the_wheel_and_the_sdist(dist):
    r = _run(sys.executable, "-m", "twine", "check", "--strict", *dist)
    assert r.stdout.count("PASSED") == 2, r.stdout


def test_the_wheel_holds_every_module_and_one_version(dist):
    wheel = zipfile.ZipFile(dist[0])
    names = set(wheel.namelist())
    for m in MODULES: assert f"kdbook/{m}.py" in names, m
    assert not any(n.startswith(("tests/", "nbs/")) for n in names)
    meta = Parser().parsestr(wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    assert meta["Version"] == kdbook.__version__ and dist[0].name.startswith(f"kdbook-{kdbook.__version__}-")
    requires = meta.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("jupyterlab", "nbdev")) for r in core), core        # the notebooks' needs are the `book` extra
    assert any(r.startswith("jupyterlab") and 'extra == "book"' in r for r in requires)
    assert meta["Description-Content-Type"] == "text/markdown" and "kdbook run" in meta.get_payload()


def test_the_installed_wheel_runs_outside_the_checkout(dist, tmp_path):
    """A venv that sees the running environment's packages (torch without a 1 GB download) but gets kdbook only from the
    wheel; run from a folder without the sources. The running environment is this test's interpreter, a venv or not:
    its site-packages folders (a venv's own and those it sees) are listed in a `.pth` file of the new venv, after
    the venv's own folder, which holds the wheel."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=True)
    py = env_dir / "bin" / "python"
    own = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    outer = [p for p in dict.fromkeys(sys.path) if p and Path(p).name in ("site-packages", "dist-packages")]
    (own / "_running_environment.pth").write_text("\n".join(outer) + "\n")
    _run(py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", dist[0])
    work = tmp_path / "elsewhere"; work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"KDBOOK_CACHE": str(tmp_path / "cache")}
    code = ("import importlib, json, kdbook; "
            f"mods = [importlib.import_module('kdbook.' + m).__file__ for m in {MODULES!r}]; "
            "print(json.dumps([kdbook.__file__, kdbook.__version__] + mods))")
    files = json.loads(_run(py, "-c", code, cwd=work, env=env).stdout)
    assert files[1] == kdbook.__version__
    for f in [files[0]] + files[2:]: assert Path(f).is_relative_to(env_dir), f                  # not the checkout's copy
    _run(env_dir / "bin" / "kdbook", "run", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--methods", "aver,moekd",
         "--out", work / "run", cwd=work, env=env)
    res = json.loads((work / "run" / "results.json").read_text())
    assert {r["status"] for r in res["runs"].values()} <= {"ok", "diverged"} and (work / "run" / "report.html").exists()
