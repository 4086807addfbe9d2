"""Every output option of every command follows one set of rules (hwmodel.cli_common): checked before any work
(an existing file needs --force; a folder, a missing parent folder or a wrong extension is a one-line error
naming the option, the path and what is accepted, exit status 2), and what was written is said on stderr, so
that --json on stdout stays parseable. Also: `simulate run` exits 3 on a plan that does not fit (--allow-oom: 0),
and the progress bar of long work is drawn on a terminal only."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

import executor.cli as execute_cli
from hwmodel.cli_common import IMAGE, JSON, check_output, format_size, progress_bar, write_output
from hwmodel.errors import UserError
from tests.helpers import CliResult

SMALL = ("-w", "gpt3-125m", "-c", "dgx-a100-80g", "--plan", "tp=1,micro_batch=1,global_batch=8")
OOM = ("-w", "llama2-7b", "-c", "dgx-a100-80g", "--plan", "micro_batch=1,global_batch=64")  # DDP of 7B: ~122 GiB


def flat(text: str) -> str:
    return re.sub(r"\s+", "", text)


def refused(result: CliResult, *fragments: str) -> None:
    assert result.code == 2, f"exit status {result.code}; stderr:\n{result.err}"
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert flat(fragment) in flat(result.err), (fragment, result.err)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a prediction, a search, a run or a measurement starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the output was refused after the work started")

    import executor.calibrate.run as calibrate_run
    import executor.vfl.party as party
    import simulator.cli as sim
    import simulator.search.galvatron.cli as galvatron
    import simulator.search.memo.cli as memo
    import simulator.search.vfl.cli as vfl

    for module, name in (
        (sim, "_predict"),
        (sim, "load_workload"),
        (galvatron, "search_galvatron"),
        (memo, "search_memo"),
        (vfl, "search_vfl"),
        (vfl, "run_vfl"),
        (vfl, "sweep_rows"),
        (execute_cli, "_run"),
        (calibrate_run, "calibrate"),
        (party, "run_party"),
    ):
        monkeypatch.setattr(module, name, forbidden)


@pytest.fixture
def execute(monkeypatch, capsys):
    monkeypatch.setattr(execute_cli, "out", Console(width=100))
    monkeypatch.setattr(execute_cli, "err", Console(stderr=True, width=100))

    def invoke(*args) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["execute", *map(str, args)])
        try:
            execute_cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


# Each command's output options: (argv before the option, option, a good file name, what is accepted).
SIMULATE_OUTPUTS = [
    (("run", *SMALL), "--out", "report.json", "*.json"),
    (("run", *SMALL), "--trace", "trace.json", "*.json"),
    (("run", *SMALL), "--plot", "timeline.png", "*.png"),
    (("compare", *SMALL, "--sweep", "tp=1,2"), "--csv", "table.csv", "*.csv"),
    (("search", "galvatron", "-w", "gpt3-350m", "-c", "dgx-a100-40g", "-m", "8GiB"), "--out", "plan.yaml", "*.yaml"),
    (("search", "memo", "-w", "llama2-7b", "-c", "hgx-a800", "--seq-len", "65536"), "--out", "plan.yaml", "*.yaml"),
    (("search", "vfl", "-w", "vfl-wdl", "-c", "two-sites-wan"), "--out", "plan.yaml", "*.yaml"),
    (("run", "-w", "vfl-wdl", "-c", "two-sites-wan"), "--out", "report.json", "*.json"),
    (("compare", "-w", "vfl-wdl", "-c", "two-sites-wan"), "--csv", "table.csv", "*.csv"),
]
EXECUTE_OUTPUTS = [
    (("-w", "gpt-tiny", "-c", "cpu-local", "-p", "dp=2,micro_batch=1,global_batch=2"), "--trace", "t.json", "*.json"),
    (("calibrate",), "--out", "box.yaml", "*.yaml"),
    (("calibrate", "--out", "box.yaml"), "--device-out", "dev.yaml", "*.yaml"),
    (("calibrate", "--out", "box.yaml"), "--raw", "raw.json", "*.json"),
    (("vfl", "run", "--party", "active", "--certs", "certs"), "--out", "result.json", "*.json"),
]
IDS = [f"{' '.join(a[:2])} {o}" for a, o, _, _ in SIMULATE_OUTPUTS]
EXECUTE_IDS = [f"execute {' '.join(a[:2])} {o}" for a, o, _, _ in EXECUTE_OUTPUTS]


@pytest.mark.parametrize(("args", "option", "name", "accepted"), SIMULATE_OUTPUTS, ids=IDS)
def test_simulate_outputs_are_checked_before_the_work(
    simulate, no_work, tmp_path, monkeypatch, args, option, name, accepted
):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / name
    existing.write_text("mine")
    refused(simulate(*args, option, existing), option, str(existing), "already exists", "--force")
    assert existing.read_text() == "mine"
    refused(simulate(*args, option, tmp_path), option, str(tmp_path), "is a folder")
    missing = tmp_path / "no-such-folder" / name
    refused(simulate(*args, option, missing), option, str(missing), "does not exist")
    wrong = tmp_path / "out.txt"
    refused(simulate(*args, option, wrong), option, str(wrong), accepted)
    assert not wrong.exists()


@pytest.mark.parametrize(("args", "option", "name", "accepted"), EXECUTE_OUTPUTS, ids=EXECUTE_IDS)
def test_execute_outputs_are_checked_before_the_work(
    execute, no_work, tmp_path, monkeypatch, args, option, name, accepted
):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / name
    existing.write_text("mine")
    refused(execute(*args, option, existing), option, str(existing), "already exists", "--force")
    assert existing.read_text() == "mine"
    refused(execute(*args, option, tmp_path), str(tmp_path))
    missing = tmp_path / "no-such-folder" / name
    refused(execute(*args, option, missing), str(missing))
    refused(execute(*args, option, tmp_path / "out.txt"), option, "out.txt", accepted)


def test_what_was_written_is_said_on_stderr_and_json_stays_parseable(simulate, tmp_path):
    report, trace, plot = tmp_path / "report.json", tmp_path / "trace.json", tmp_path / "timeline.png"
    result = simulate("run", *SMALL, "--json", "--out", report, "--trace", trace, "--plot", plot)
    assert result.code == 0, result.err
    assert json.loads(result.out)["workload"] == "gpt3-125m"  # stdout is the JSON alone
    for path in (report, trace, plot):
        assert path.stat().st_size > 0
        said = re.escape(flat(f"wrote {path}")) + r"\(\d+(\.\d)?[kM]?B\)"
        assert re.search(said, flat(result.err)), result.err


def test_compare_csv_is_written_and_force_replaces(simulate, tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("mine")
    result = simulate("compare", *SMALL, "--sweep", "tp=1,2", "--csv", target, "--force")
    assert result.code == 0, result.err
    assert target.read_text().startswith("cluster,tp,") and "wrote" in result.err


# ---- a plan that does not fit -----------------------------------------------------------------------------
def test_run_exits_3_when_the_plan_does_not_fit_after_printing_the_report(simulate, tmp_path):
    out = tmp_path / "report.json"
    result = simulate("run", *OOM, "-e", "analytic", "--json", "--out", out)
    assert result.code == 3, result.err
    assert json.loads(result.out)["fits_memory"] is False  # the report is printed (and written) first
    assert json.loads(out.read_text())["fits_memory"] is False
    assert "does not fit" in result.err and "--allow-oom" in result.err


def test_allow_oom_accepts_it(simulate):
    result = simulate("run", *OOM, "-e", "analytic", "--json", "--allow-oom")
    assert result.code == 0, result.err
    assert json.loads(result.out)["fits_memory"] is False


def test_a_plan_that_fits_exits_0(simulate):
    assert simulate("run", *SMALL, "-e", "analytic").code == 0


def test_run_help_documents_the_exit_status(simulate):
    text = flat(simulate("run", "--help").out)
    assert flat("--allow-oom") in text and "exit" in text and "3" in text


# ---- galvatron prints the per-layer plan it chose ---------------------------------------------------------
def test_galvatron_plan_strings_name_the_per_layer_strategies(simulate, monkeypatch):
    args = ("search", "galvatron", "-w", "gpt3-350m", "-c", "dgx-a100-40g", "-m", "8GiB", "--global-batch", "32")
    args += ("--no-engine-rerank",)
    best = json.loads(simulate(*args, "--json").out)["best"]["plan"]
    assert best["layers"], "this search chooses per-layer strategies; the test needs a plan with them"
    monkeypatch.setenv("COLUMNS", "400")  # plan strings unfolded
    table = simulate(*args).out
    chosen = next(line for line in table.splitlines() if "chosen" in line)
    for strategy in best["layers"]:
        first, last = strategy["layers"]
        assert f"layers {first}-{last}: tp={strategy['tp']}" in chosen, chosen
        assert f"dp_type={strategy['dp_type']}" in chosen.split(f"layers {first}-{last}:")[1]


def test_shorthand_with_sections_names_layers_and_stages():
    from simulator.plan import Plan

    plan = Plan(
        tp=2,
        layers=[{"layers": (0, 3), "tp": 1, "dp_type": "zero2"}],
        stages=[{"num_layers": 2, "devices": "0-3"}, {"num_layers": 2, "devices": "4-7", "tp": 4}],
        pp=2,
    )
    assert plan.shorthand() == "tp=2,pp=2"  # the uniform keys alone, as before
    text = plan.shorthand(sections=True)
    assert "layers 0-3: tp=1,dp_type=zero2" in text and "stages 2+2 on 0-3/4-7 tp 2/4" in text


# ---- the shared helpers -----------------------------------------------------------------------------------
def test_check_output_messages(tmp_path):
    with pytest.raises(UserError, match=r"--plot .*x\.txt: name the file \*\.png, \*\.pdf or \*\.svg"):
        check_output(tmp_path / "x.txt", "--plot", IMAGE, False)
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match=r"the folder .* is a file, not a folder"):
        check_output(tmp_path / "f" / "x.json", "--out", JSON, False)


def test_write_output_says_what_it_wrote(tmp_path):
    console = Console(file=io.StringIO(), width=200)
    write_output(tmp_path / "r.json", "x" * 4100, "--out", JSON, False, console)
    assert console.file.getvalue().strip() == f"wrote {tmp_path / 'r.json'} (4.1 kB)"
    assert (format_size(812), format_size(12_300_000)) == ("812 B", "12.3 MB")


def test_progress_bar_is_drawn_on_a_terminal_only():
    piped = Console(file=io.StringIO())
    with progress_bar(piped) as progress:
        progress.add_task("work", total=3)
    assert progress.disable and piped.file.getvalue() == ""
    terminal = Console(file=io.StringIO(), force_terminal=True)
    with progress_bar(terminal) as progress:
        progress.add_task("work", total=3)
    assert not progress.disable


def test_long_commands_use_the_shared_progress_bar():
    """One helper for every progress bar: no command builds its own rich Progress."""
    root = Path(__file__).resolve().parents[2]
    for path in (
        "simulator/cli.py",
        "simulator/search/galvatron/cli.py",
        "executor/cli.py",
        "executor/calibrate/cli.py",
    ):
        text = (root / path).read_text()
        assert "progress_bar(" in text, path
        assert "with Progress(" not in text, path
