"""The README's two commands are the ones the project really uses."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_readme_has_exactly_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].startswith("pip install -e . && "), cmds[0]
    assert cmds[1].startswith('pip install -e ".[dev]" && '), cmds[1]


def test_ci_runs_the_readme_test_command():
    test_cmd = readme_commands()[1].split(" && ", 1)[1]
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines, f"{test_cmd!r} is not a line of .ci/run"
    # it is the last command, so CI output ends with pytest's summary line
    assert [l for l in ci_lines if l and not l.startswith("#")][-1] == test_cmd
