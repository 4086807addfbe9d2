"""`execute vfl`: credentials, one party of a vertical federated run, or both parties on this machine.

    execute vfl keys --out certs/
    execute vfl run --party active  --plan plan.yaml --cluster two-sites-wan --certs certs/ --listen 0.0.0.0:47000
    execute vfl run --party passive --plan plan.yaml --cluster two-sites-wan --certs certs/ --peer HOST:47000
    execute vfl local --plan plan.yaml --cluster two-sites-wan

The plan's `federated` section says the mode (vanilla, fedbcd, celu), the workset size W and the uses per batch
R (the fresh update included); its `parties` are the cluster sites of the active and the passive party, in that
order. Without --plan the run is vanilla VFL; --mode/--workset/--local-updates override the plan.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hwmodel.cli_common import JSON, check_output, make_console, report_written, run_app, write_output
from hwmodel.errors import UserError

out = make_console()
err = make_console(stderr=True)

vfl_app = typer.Typer(
    name="vfl",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Vertical federated training (CELU-VFL, FedBCD, vanilla) between two parties over TCP + mutual TLS 1.3.",
)

DEFAULT_PORT = 47000


def _address(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"{option} must be HOST:PORT (e.g. 10.0.0.2:{DEFAULT_PORT}), got {value!r}")
    return host.strip("[]"), int(port)


def _overrides(values: list[str]) -> dict:
    import yaml

    result = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE (a workload field, e.g. num_samples=50000), got {item!r}")
        result[key.strip()] = yaml.safe_load(raw)
    return result


def resolve_federated(
    plan: str | None,
    cluster: str | None,
    mode: str | None,
    workset: int | None,
    local_updates: int | None,
) -> dict:
    """Mode, W, R (and the sites) from the plan and the cluster, with command-line overrides."""
    settings: dict[str, Any] = {"mode": "vanilla", "workset": 1, "local_updates": 1, "sites": None, "wan": None}
    if plan is not None:
        from simulator.plan import load_plan

        fed = load_plan(plan).federated
        if fed is None:
            raise UserError(
                f"--plan {plan} has no federated section; add e.g. `federated: {{parties: [dc-a, dc-b], "
                "mode: celu, workset: 4, local_updates: 5}` (parties: the active's site, then the passive's)"
            )
        if len(fed.parties) != 2:
            raise UserError(f"--plan {plan}: federated.parties lists {len(fed.parties)} parties; this runtime runs two")
        settings.update(mode=fed.mode, workset=fed.workset, local_updates=fed.local_updates, sites=tuple(fed.parties))
    if cluster is not None:
        from hwmodel.catalog import load_cluster

        spec = load_cluster(cluster)
        sites = spec.sites
        if len(sites) < 2:
            raise UserError(
                f"cluster {spec.name!r} has one site ({sites[0]}); a federated run needs two sites joined by WAN"
            )
        wanted = settings["sites"] or tuple(sites[:2])
        for site in wanted:
            if site not in sites:
                raise UserError(
                    f"plan.federated.parties names site {site!r}; cluster {spec.name!r} has sites {', '.join(sites)}"
                )
        settings["sites"] = wanted
        link = spec._wan(*wanted[:2])
        if link is not None:
            settings["wan"] = {"bandwidth_bytes_per_s": link.bandwidth, "latency_s": link.latency}
    for key, value in (("mode", mode), ("workset", workset), ("local_updates", local_updates)):
        if value is not None:
            settings[key] = value
    if settings["mode"] not in ("vanilla", "fedbcd", "celu"):
        raise UserError(f"--mode must be vanilla, fedbcd or celu, got {settings['mode']!r}")
    return settings


def _check_checkpoints(checkpoint_dir: Path | None, party: str, resume: bool, force: bool) -> None:
    from executor.vfl import checkpoint

    if checkpoint_dir is None:
        return
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UserError(f"--checkpoint-dir {checkpoint_dir} is a file, not a folder")
    if resume and not checkpoint.has_any(checkpoint_dir, party):
        raise UserError(f"--resume: {checkpoint_dir / party} holds no checkpoint of the {party} party")
    if not resume and checkpoint.has_any(checkpoint_dir, party) and not force:
        raise UserError(
            f"--checkpoint-dir {checkpoint_dir} already holds {party} checkpoints; pass --resume to continue "
            "from them, another folder, or --force to write over them"
        )


@vfl_app.command("keys")
def keys_command(
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Folder for ca.crt/key and the two parties' certificates and keys."
    ),
    days: int = typer.Option(30, "--days", help="Validity of the certificates in days."),
    force: bool = typer.Option(False, "--force", help="Replace certificates already in the folder."),
) -> None:
    """Make the job's CA and the active and passive parties' certificates (EC P-256, TLS 1.3, mutual auth)."""
    from executor.vfl.keys import make_keys

    written = make_keys(out_dir, days=days, force=force)
    for path in written:
        report_written(path, err)
    out.print(
        f"wrote {len(written)} files to {out_dir}: give each party its own folder ({out_dir}/active, "
        f"{out_dir}/passive); keep {out_dir}/ca (the CA key) with whoever admits parties"
    )


@vfl_app.command("run")
def run_command(
    party: str = typer.Option(
        ...,
        "--party",
        help="active (dense fields, labels, top model; listens) or passive (categorical fields; connects).",
    ),
    workload: str = typer.Option(
        "vfl-wdl", "--workload", "-w", help="VFL workload name (vfl-wdl, vfl-wdl-tiny) or file with family: vfl-wdl."
    ),
    plan: str | None = typer.Option(
        None, "--plan", "-p", help="Plan file with a federated section (mode, workset W, local_updates R)."
    ),
    cluster: str | None = typer.Option(
        None, "--cluster", "-c", help="Cluster with two sites joined by WAN, e.g. two-sites-wan."
    ),
    certs: Path = typer.Option(
        ..., "--certs", help="Folder with ca.crt and this party's PARTY.crt/PARTY.key (`execute vfl keys`)."
    ),
    listen: str | None = typer.Option(
        None,
        "--listen",
        help=f"Active party: HOST:PORT to listen on (default 127.0.0.1:{DEFAULT_PORT}, this machine only; "
        "0.0.0.0:PORT for every interface).",
    ),
    peer: str | None = typer.Option(None, "--peer", help="Passive party: the active party's HOST:PORT."),
    mode: str | None = typer.Option(None, "--mode", help="Override the plan: vanilla, fedbcd or celu."),
    workset: int | None = typer.Option(None, "--workset", "-W", min=1, help="Override the plan's workset size W."),
    local_updates: int | None = typer.Option(
        None, "--local-updates", "-R", min=1, help="Override R (uses per batch, the fresh one included)."
    ),
    sampling: str = typer.Option(
        "uniform", "--sampling", help="uniform (CELU-VFL) or latest (ablation: no uniform sampling)."
    ),
    no_weighting: bool = typer.Option(False, "--no-weighting", help="Ablation: all instance weights 1."),
    threshold: float = typer.Option(
        0.5, "--threshold", help="Instance weights below this cosine similarity are zeroed."
    ),
    grad_noise: float = typer.Option(
        0.0,
        "--grad-noise",
        min=0.0,
        help="Active party: label-leakage defence, Gaussian noise of this many times the RMS gradient added to the "
        "gradients sent to the passive party (0: off; costs AUC, see BENCHMARKS.md).",
    ),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Training epochs."),
    max_rounds: int | None = typer.Option(None, "--max-rounds", min=1, help="Stop after this many rounds (batches)."),
    eval_every: int = typer.Option(
        0, "--eval-every", min=0, help="Rounds between test-AUC evaluations (0: each epoch)."
    ),
    checkpoint_dir: Path | None = typer.Option(
        None, "--checkpoint-dir", help="Folder for this party's checkpoints (DIR/PARTY/)."
    ),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0, help="Save every K rounds (and at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint round both parties have."),
    force: bool = typer.Option(False, "--force", help="Write checkpoints over existing ones; replace the --out file."),
    timeout: float = typer.Option(
        120.0, "--timeout", help="Seconds to wait for a message before declaring the peer gone."
    ),
    connect_timeout: float = typer.Option(60.0, "--connect-timeout", help="Seconds to wait for the first connection."),
    reconnect_timeout: float = typer.Option(
        15.0, "--reconnect-timeout", help="Seconds to try reconnecting after a drop."
    ),
    set_fields: list[str] = typer.Option(
        [], "--set", help="Workload field override KEY=VALUE (repeatable), e.g. num_samples=50000."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch intra-op threads of this party."),
    result_out: Path | None = typer.Option(None, "--out", help="Write the result as JSON (*.json) to this new file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
) -> None:
    """Run one party of a vertical federated training job."""
    from executor.vfl.party import PartyConfig, run_party
    from workloads.vfl import batches_per_epoch, load_vfl_workload

    if party not in ("active", "passive"):
        raise UserError(f"--party must be active or passive, got {party!r}")
    if party == "active" and peer is not None:
        raise UserError("the active party listens: give it --listen HOST:PORT (--peer is the passive party's)")
    if party == "passive" and listen is not None:
        raise UserError("the passive party connects: give it --peer HOST:PORT (--listen is the active party's)")
    if party == "passive" and peer is None:
        raise UserError("the passive party needs --peer HOST:PORT, the active party's address")
    if sampling not in ("uniform", "latest"):
        raise UserError(f"--sampling must be uniform or latest, got {sampling!r}")
    if result_out is not None:
        check_output(result_out, "--out", JSON, force)
    settings = resolve_federated(plan, cluster, mode, workset, local_updates)
    cfg = PartyConfig(
        party=cast(Literal["active", "passive"], party),
        workload=load_vfl_workload(workload, **_overrides(set_fields)),
        certs=str(certs),
        mode=settings["mode"],
        workset=settings["workset"],
        local_updates=settings["local_updates"],
        sampling=cast(Literal["uniform", "latest"], sampling),
        weighting=not no_weighting,
        threshold=threshold,
        grad_noise=grad_noise,
        epochs=epochs,
        max_rounds=max_rounds,
        eval_every=eval_every,
        listen=_address(listen or f"127.0.0.1:{DEFAULT_PORT}", "--listen") if party == "active" else None,
        connect=_address(peer or "", "--peer") if party == "passive" else None,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        checkpoint_every=checkpoint_every,
        resume=resume,
        timeout=timeout,
        connect_timeout=connect_timeout,
        reconnect_timeout=reconnect_timeout,
        threads=threads,
        log=None if quiet else (lambda message: err.print(f"\\[{party}] {escape(message)}", highlight=False)),
    )
    cfg.check()
    _check_checkpoints(checkpoint_dir, party, resume, force)
    from executor.vfl.keys import party_files

    party_files(certs, party)
    result = run_party(cfg)
    data = {
        **result.to_dict(),
        "workset": cfg.workset,
        "local_updates_per_batch": cfg.local_updates,
        "sampling": cfg.sampling,
        "weighting": cfg.weighting,
        "workload": cfg.workload.name,
        "batches_per_epoch": batches_per_epoch(cfg.workload),
        "sites": settings["sites"],
        "wan": settings["wan"],
    }
    if result_out is not None:
        write_output(result_out, json.dumps(data, indent=2), "--out", JSON, True, err)  # checked (and --force) above
    if as_json:
        print(json.dumps(data, indent=2))
    elif not quiet and result_out is None:
        render(data, err)


def render(data: dict, console: Console) -> None:
    table = Table(
        title=f"{data['party']} party, {data['mode']} (W={data['workset']}, R={data['local_updates_per_batch']})"
    )
    for col in ("rounds", "training time", "wall time", "local updates", "final test AUC", "sent", "received"):
        table.add_column(col, justify="right")
    auc = data.get("final_auc")
    table.add_row(
        str(data["rounds"]),
        f"{data['train_time_s']:.1f} s",
        f"{data['wall_time_s']:.1f} s",
        str(data["local_updates_done"]),
        "-" if auc is None else f"{auc:.4f}",
        f"{data['bytes_sent'] / 2**20:.1f} MiB",
        f"{data['bytes_received'] / 2**20:.1f} MiB",
    )
    console.print(table)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def party_command_line(party: str, certs: Path, address: str, args: list[str]) -> list[str]:
    """The command that runs one party as its own process (used by `local` and the WAN benchmark)."""
    where = ["--listen", address] if party == "active" else ["--peer", address]
    return [sys.executable, "-m", "executor.vfl.cli", "run", "--party", party, "--certs", str(certs), *where, *args]


@vfl_app.command("local", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def local_command(
    ctx: typer.Context,
    certs: Path | None = typer.Option(
        None, "--certs", help="Folder with the certificates (default: fresh ones in a temporary folder)."
    ),
    port: int = typer.Option(0, "--port", help="Port of the active party on 127.0.0.1 (default: a free one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the active party's result as JSON."),
) -> None:
    """Start both parties on this machine, each its own process; any `run` option (e.g. --plan, --epochs) passes
    through."""
    from executor.vfl.keys import make_keys

    passthrough = list(ctx.args)
    for banned in ("--party", "--listen", "--peer", "--out", "--json"):
        if banned in passthrough:
            raise UserError(f"`execute vfl local` sets {banned} itself; leave it out")
    with tempfile.TemporaryDirectory(prefix="vfl-local-") as tmp:
        if certs is None:
            certs = Path(tmp) / "certs"
            make_keys(certs)
        result_file = Path(tmp) / "active.json"
        address = f"127.0.0.1:{port or _free_port()}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = {
            "active": subprocess.Popen(
                party_command_line("active", certs, address, [*passthrough, "--out", str(result_file)]), env=env
            ),
            "passive": subprocess.Popen(
                party_command_line("passive", certs, address, [*passthrough, "--quiet"]), env=env
            ),
        }
        codes = _wait_both(procs)
        if any(codes.values()):
            failed = ", ".join(f"{p} (exit {c})" for p, c in codes.items() if c)
            raise UserError(f"the run stopped: {failed}; see the messages above")
        data = json.loads(result_file.read_text())
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        render(data, out)


def _wait_both(procs: dict[str, subprocess.Popen]) -> dict[str, int]:
    """Wait for both parties; Ctrl-C stops both."""
    try:
        return {party: proc.wait() for party, proc in procs.items()}
    except KeyboardInterrupt:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=10)
        raise


def run_from_execute(workload: str, cluster: str | None, plan: str | None, party: str | None) -> None:
    """`execute --workload vfl-wdl --cluster C --plan P --party active|passive`: one party with the defaults
    (certificates in $HETPLAN_VFL_CERTS or ./vfl-certs, the active party at $HETPLAN_VFL_PEER or 127.0.0.1:47000)."""
    if party is None:
        raise UserError(
            f"{workload} is a two-party federated workload: add --party active or --party passive "
            "(or run both here with `execute vfl local`)"
        )
    certs = Path(os.environ.get("HETPLAN_VFL_CERTS", "vfl-certs"))
    address = os.environ.get("HETPLAN_VFL_PEER", f"127.0.0.1:{DEFAULT_PORT}")
    kwargs = {"listen": address if party == "active" else None, "peer": address if party == "passive" else None}
    run_command(
        party=party,
        workload=workload,
        plan=plan,
        cluster=cluster,
        certs=certs,
        **kwargs,
        mode=None,
        workset=None,
        local_updates=None,
        sampling="uniform",
        no_weighting=False,
        threshold=0.5,
        grad_noise=0.0,
        epochs=1,
        max_rounds=None,
        eval_every=0,
        checkpoint_dir=None,
        checkpoint_every=0,
        resume=False,
        force=False,
        timeout=120.0,
        connect_timeout=60.0,
        reconnect_timeout=15.0,
        set_fields=[],
        threads=1,
        result_out=None,
        as_json=False,
        quiet=False,
    )


def main() -> None:
    run_app(vfl_app, err)


if __name__ == "__main__":
    main()
