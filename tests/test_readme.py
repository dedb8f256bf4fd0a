"""README's two commands on a fresh machine, and CI running exactly the second (DEVELOPERS: .ci/run
must call README's test command after README's install)."""
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The bash blocks of README's "Two commands on a fresh machine" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def steps(command: str) -> list[list[str]]:
    """A `a && b && c` line as its commands, each as argv; CI's quiet installs (-q) count as README's."""
    argvs = [shlex.split(part) for part in command.split("&&")]
    return [[a for a in argv if not ("install" in argv and a == "-q")] for argv in argvs]


def ci_steps() -> list[list[str]]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    body = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    # set -e and the cd to the repository root are CI's frame, not README's command
    body = [line for line in body if not line.startswith(("set ", "cd "))]
    return [step for line in body for step in steps(line)]


def test_readme_gives_an_install_and_run_and_a_test_command():
    run, test = readme_commands()
    assert steps(run)[-1] == [".venv/bin/python", "-m", "helix_sweep.run"]
    assert steps(test)[-1] == [".venv/bin/python", "-m", "pytest", "-q"]
    # the same install before each; the sweep's compiles only the bytecode a sweep reads
    assert steps(run)[:-2] == [[a for a in s if a != "--compile-bytecode"] for s in steps(test)[:-1]]


def test_ci_runs_readme_install_then_readme_test_command():
    _, test = readme_commands()
    assert ci_steps() == steps(test)


def test_install_writes_bytecode():
    # uv writes no .pyc by default; with PYTHONDONTWRITEBYTECODE=1 (these machines) every Ray
    # worker would compile torch's sources on import: 199 s against 108 s for the smoke sweep. The
    # test command compiles the whole environment (uv's --compile-bytecode), the sweep's what a
    # sweep imports (python -m helix_sweep.bytecode), right before its Python command.
    run, test = readme_commands()
    assert steps(run)[-2] == [".venv/bin/python", "-m", "helix_sweep.bytecode"]
    uv_install = [s for s in steps(test) if s[1:3] == ["pip", "install"] and "uv" in s[0]]
    assert uv_install and all("--compile-bytecode" in s for s in uv_install), test
