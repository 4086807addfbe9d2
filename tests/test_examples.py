"""Every example a user is shown runs as written: the commands in README.md's code blocks and the examples in
each command's --help.

README: every line of an indented code block that starts with `simulate`, `execute`, `torchrun` or `make`
(continued by a trailing backslash; `# ...` comments dropped). --help: every "Label:  COMMAND" (a colon, two
spaces, then `simulate`, `execute` or `torchrun`, up to the end of the paragraph) in the help of every command
and option of `simulate` and `execute`.

Each command runs for real in a fresh folder (README blocks in order in one folder, since a later command may use
a file an earlier one wrote), as `python -m simulator.cli` / `python -m executor.cli` /
`python -m torch.distributed.run` with this checkout first on the path, and must exit 0 without a traceback.
The few that cannot run here are listed in NOT_RUN with the reason, and the full calibration runs with --quick
(SHORTENED, with the reason); they are still parsed by the command they
name (an unknown option or a missing value fails), and a new example matches no rule until it is given one.
The ones that start torch processes are marked slow (they take most of the time).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

PROGRAMS = ("simulate", "execute", "torchrun", "make")
MODULES = {"simulate": "simulator.cli", "execute": "executor.cli", "torchrun": "torch.distributed.run"}

# (pattern on the command, reason it is only parsed here)
NOT_RUN = (
    (r"^make demo\b", "creates .venv and installs hetplan: the setup this suite already runs in"),
    (r"^make test\b", "runs the whole test suite, this test included"),
    (r"^torchrun .*--nnodes", "needs two nodes of GPUs (dgx-h100); the single-node CPU torchrun example runs"),
)
SLOW = (r"^execute\b", r"^torchrun\b", r"^simulate search galvatron\b")
# (pattern, arguments added, reason): run shortened, the same code on less work.
SHORTENED = (
    (
        r"^execute calibrate\b(?!.*--quick)",
        ["--quick"],
        "a full calibration takes ~7 min on a busy 2-core machine; --quick measures the same things on fewer sizes",
    ),
)


def readme_commands() -> list[str]:
    commands, pending = [], ""
    for raw in (REPO_ROOT / "README.md").read_text().splitlines():
        if not raw.startswith("    ") and not pending:
            continue
        line = raw.strip()
        if not pending and not line.startswith(PROGRAMS):
            continue
        pending += (" " if pending else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            commands.append(shlex.join(shlex.split(pending, comments=True)))
            pending = ""
    return commands


def _help_texts() -> list[str]:
    import typer

    import executor.cli
    import simulator.cli

    texts: list[str] = []

    def walk(command) -> None:
        texts.extend(t for t in (command.help, getattr(command, "epilog", None)) if t)
        texts.extend(p.help for p in command.params if getattr(p, "help", None))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    for app in (simulator.cli.app, executor.cli.app):
        walk(typer.main.get_command(app))
    return texts


def help_commands() -> list[str]:
    found = []
    for text in _help_texts():
        for match in re.finditer(r":  ((?:simulate|execute|torchrun) [^\n]+)", text):
            found.append(match.group(1).strip())
    return list(dict.fromkeys(found))


def argv(command: str) -> list[str]:
    words = shlex.split(command)
    for pattern, extra, _ in SHORTENED:
        if re.search(pattern, command):
            words += extra
    return [sys.executable, "-m", MODULES[words[0]], *words[1:]]


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def not_run_reason(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, command)), None)


def parses(command: str) -> None:
    """The command's program accepts its arguments (parsed, not run)."""
    words = shlex.split(command)
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.M)
        assert words[1] in targets, f"`{command}`: the Makefile has no target {words[1]}"
        return
    if words[0] == "torchrun":
        module = words.index("-m")
        assert words[module + 1] == "executor.cli", command
        import torch.distributed.run as torchrun

        torchrun.get_args_parser().parse_args(words[1:])
        words = ["execute", *words[module + 2 :]]
    import typer

    import executor.cli
    import simulator.cli

    app = {"simulate": simulator.cli.app, "execute": executor.cli.app}[words[0]]
    group = typer.main.get_command(app)
    args = words[1:]
    context = group.make_context(words[0], list(args))
    while hasattr(group, "commands"):
        protected = getattr(context, "_protected_args", None) or getattr(context, "protected_args", [])
        rest = [*protected, *context.args]
        if not rest or rest[0] not in group.commands:
            break
        group = group.commands[rest[0]]
        context = group.make_context(rest[0], rest[1:], parent=context)


def run(command: str, cwd: Path) -> None:
    result = subprocess.run(argv(command), cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, f"`{command}`:\n{result.stderr[-3000:]}"


def is_slow(command: str) -> bool:
    return any(re.search(p, command) for p in SLOW)


# ---- the lists themselves ---------------------------------------------------------------------------------
def test_the_examples_are_found():
    readme, helps = readme_commands(), help_commands()
    assert any(c.startswith("simulate run") for c in readme) and any(c.startswith("torchrun") for c in readme)
    assert any(c.startswith("execute --workload") for c in helps) and any(c.startswith("simulate demo") for c in helps)
    assert any(c.startswith("torchrun") and "--nnodes" in c for c in helps)


@pytest.mark.parametrize("command", readme_commands() + help_commands(), ids=lambda c: " ".join(c.split()[:3]))
def test_every_example_parses(command):
    parses(command)


def test_no_example_names_a_file_that_nothing_writes():
    """An example that reads a file (a workload, cluster or plan YAML) names one the catalog has or an earlier
    README command writes (the bug was `execute --help` naming a missing my-gpt.yaml)."""
    written: set[str] = set()
    for command in readme_commands() + help_commands():
        words = shlex.split(command)
        for option in ("--workload", "-w", "--cluster", "-c", "--plan", "-p"):
            if option in words:
                value = words[words.index(option) + 1]
                if value.endswith((".yaml", ".yml", ".json")):
                    assert value in written or (REPO_ROOT / value).exists(), f"`{command}` reads {value}"
        for option in ("--out", "-o", "--trace", "--csv"):
            if option in words:
                written.add(words[words.index(option) + 1])


# ---- run them ---------------------------------------------------------------------------------------------
def _readme_runs(slow: bool) -> list[str]:
    return [c for c in readme_commands() if not_run_reason(c) is None and is_slow(c) == slow]


def test_readme_commands_run(tmp_path):
    """The quick ones (simulate), in README order in one folder."""
    for command in _readme_runs(slow=False):
        run(command, tmp_path)


@pytest.mark.slow
def test_readme_commands_that_start_ranks_run(tmp_path):
    """execute, torchrun and the galvatron search, in README order in one folder (calibrate before the run that
    uses its spec)."""
    for command in _readme_runs(slow=True):
        run(command, tmp_path)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, marks=[pytest.mark.slow] if is_slow(c) else [], id=" ".join(c.split()[:3]))
        for c in help_commands()
        if not_run_reason(c) is None
    ],
)
def test_help_examples_run(command, tmp_path):
    run(command, tmp_path)


def test_not_run_examples_have_a_reason():
    skipped = [c for c in readme_commands() + help_commands() if not_run_reason(c)]
    assert skipped, "NOT_RUN lists commands that no longer exist; remove the rule"
    for pattern, why in NOT_RUN:
        assert any(re.search(pattern, c) for c in readme_commands() + help_commands()), f"stale rule {pattern}"
        assert len(why) > 20
