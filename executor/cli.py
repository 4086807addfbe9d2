"""`execute`: run a plan on real devices and report what happened next to the prediction.

`execute --workload W --cluster C --plan P` checks the plan (the simulator's `bind`, the features the
executor can run, the devices, the predicted memory), starts one process per device (or joins a
torchrun rendezvous), trains for --warmup + --steps iterations on synthetic data and prints the
measured Report; `--compare` puts the simulator's prediction beside it. `execute calibrate` measures
this machine and writes a cluster spec.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.markup import escape

from executor.calibrate import cli as calibrate_cli
from executor.paging.cli import paging_command
from executor.vfl.cli import vfl_app
from hwmodel.cli_common import JSON, check_output, make_console, progress_bar, report_written, run_app
from hwmodel.errors import UserError

out = make_console()
err = make_console(stderr=True)

HELP = (
    "Run a training plan on real devices (one process per device, or under torchrun across nodes), "
    "measure iteration time, throughput and memory, and compare with the simulator's prediction.\n\n"
    "Example (4 CPU ranks, gloo):  execute --workload gpt-tiny --cluster cpu-local --devices-per-node 4 "
    "--plan 'tp=2,pp=2,micro_batch=1,global_batch=8,dtype=fp32' --steps 3 --compare\n\n"
    "Across nodes, run the same command under torchrun on every node (each process is one rank; the plan's device "
    "count = nodes x processes per node). On the first of 2 nodes, HOST0 (--node-rank 1 on the second; "
    "--rdzv-endpoint is HOST0's address and a free port, where the ranks meet):  torchrun --nnodes 2 "
    "--nproc-per-node 8 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 -m executor.cli "
    "--workload llama2-7b --cluster dgx-h100 --nodes 2 --plan 'tp=8,micro_batch=1,global_batch=16' --steps 5\n\n"
    "--compare on the catalog's cpu-local predicts a generic CPU core, not this machine (several times off in time, "
    "far off in memory): run `execute calibrate --out my-machine.yaml` once and pass `--cluster my-machine.yaml`.\n\n"
    "What runs: tp (DTensor), sequence_parallel, pp with gpipe/1f1b/interleaved (torch.distributed.pipelining), "
    "dp with ddp (FSDP2 replicate), zero1 (DDP + ZeroRedundancyOptimizer), zero2/zero3 (FSDP2 fully_shard), "
    "recompute selective/full (checkpoint_wrapper), per-layer tp/dp_type/recompute layouts (activations redistributed "
    "between them), uneven pipeline stages, uneven data-parallel batch splits (batch_split=3+1), "
    "activation offload to host and MEMO token-wise "
    "recompute "
    "(recompute=tokenwise with offload=alpha), context parallelism (cp: each rank holds two of 2*cp token chunks, "
    "keys and values all-gathered; with tp, pp, dp, ZeRO, recompute and MEMO), dtype fp32/bf16, gpt and llama "
    "workloads; vfl-wdl runs its two parties (see `execute vfl --help`). Refused with the reason: cp with zero1, "
    "batch_split or per-layer layouts, ep > 1, model-state pages, tasks, fp16, stages with their own tp or device "
    "groups, zero1 with tp > 1 or with per-layer layouts.\n\n"
    "Measured: median iteration time after --warmup (the slowest rank's), tokens/s, samples/s, MFU/HFU (shared "
    "definitions), the loss per iteration (in --json), peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU "
    "an account of parameter, gradient and optimizer-state bytes plus the peak of saved activations tracked with "
    "saved-tensor hooks (no allocator there: temporaries and communication buffers are not counted).\n\n"
    "Faults: a rank that dies stops the others within seconds and execute exits with status 1 naming the rank. "
    "Drill: HETPLAN_FAIL_AT_STEP=K [HETPLAN_FAIL_RANK=R] [HETPLAN_FAIL_MODE=kill|raise] kills (or fails) rank R at "
    "the start of iteration K (HETPLAN_FAIL_MODE=nan sets a weight to NaN instead).\n\n"
    "Exit status: 0 done; 1 a rank failed; 2 bad input (options, files, a checkpoint folder in use by another run, "
    "no checkpoint that verifies); 4 a non-finite loss or gradient norm stopped the run (named: step and rank; "
    "--skip-nonfinite skips such iterations instead and the Report counts them).\n\n"
    "Checkpoints: every file is checksummed in a manifest written last; --resume verifies first and falls back to "
    "the newest step that verifies, with a warning; `execute checkpoint verify DIR` checks a folder."
)
WORKLOAD_HELP = (
    "Workload name (see `simulate workloads list`), a workload YAML or a Hugging Face config.json "
    "(gpt or llama family)."
)
CLUSTER_HELP = (
    "Cluster name (see `simulate specs list`) or YAML; its devices say what runs: cpu devices with gloo, "
    "GPUs with NCCL."
)
PLAN_HELP = (
    "Plan YAML/JSON file or shorthand such as 'tp=2,pp=2,micro_batch=1,global_batch=8,dtype=fp32'. dp left out fills "
    "the cluster; the world size is the plan's device count."
)

app = typer.Typer(
    name="execute", help=HELP, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
)
app.command("calibrate")(calibrate_cli.calibrate_command)
app.add_typer(vfl_app, name="vfl")
app.command("paging")(paging_command)
checkpoint_app = typer.Typer(help="Checkpoint folders written by `execute --checkpoint-dir`.", add_completion=False)
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("verify")
def verify_command(folder: Path = typer.Argument(..., help="A --checkpoint-dir folder.")) -> None:
    """Check every step of a checkpoint folder against its manifest (sizes and XXH3-64 checksums).

    Exit status 0 when every step verifies, 2 when one does not (each is named with the file at fault)."""
    from executor import checkpoint

    if not folder.is_dir():
        raise UserError(f"checkpoint verify: {folder} is not a folder (give a --checkpoint-dir folder)")
    steps = checkpoint.step_folders(folder)
    if not steps:
        raise UserError(f"checkpoint verify: {folder} holds no step-NNNNNN folders")
    bad = []
    for _, path in steps:
        problem = checkpoint.verify(path)
        if problem is None:
            out.print(f"{path.name}: ok", highlight=False)
        else:
            bad.append(problem)
            out.print(f"{escape(problem)}", highlight=False)
    if bad:
        raise UserError(f"checkpoint verify: {len(bad)} of {len(steps)} step(s) in {folder} do not verify")


def _check_options(
    trace: Path | None, checkpoint_dir: Path | None, checkpoint_every: int | None, resume: bool, force: bool
) -> str | None:
    """Options a person can get wrong, checked before anything is loaded; returns the absolute trace path."""
    if checkpoint_every is not None and checkpoint_dir is None:
        raise UserError("--checkpoint-every needs --checkpoint-dir (where to write the checkpoints)")
    if resume and checkpoint_dir is None:
        raise UserError("--resume needs --checkpoint-dir (the folder holding the checkpoints to resume from)")
    if checkpoint_dir is not None and checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UserError(f"--checkpoint-dir {checkpoint_dir} is a file, not a folder")
    if trace is not None:
        check_output(trace, "--trace", JSON, force)
        _probe_writable(trace)
        return str(trace.resolve())
    return None


def _probe_writable(trace: Path) -> None:
    """Create (and remove) the --trace file now, so a path that cannot be written is exit 2 before training
    rather than a trace silently missing after it (permissions, a read-only or pseudo file system)."""
    if trace.exists():
        if not os.access(trace, os.W_OK):
            raise UserError(f"--trace {trace}: cannot write that file (no permission); choose a writable path")
        return
    try:
        fd = os.open(trace, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError as exc:
        raise UserError(f"--trace {trace}: cannot create it ({exc.strerror}); choose a writable path") from None
    os.close(fd)
    trace.unlink()


def _check_checkpoint_dir(job, force: bool) -> None:
    from executor import checkpoint

    if job.checkpoint_dir is None:
        return
    root = Path(job.checkpoint_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"--checkpoint-dir {root} is a file, not a folder")
    if job.resume:
        step, path, skipped = checkpoint.check_resumable(root, job.fingerprint())
        for problem in skipped:
            err.print(
                f"[yellow]warning:[/yellow] checkpoint {escape(problem)}; resuming from {path.name} instead",
                highlight=False,
            )
        if step >= job.total_steps:
            raise UserError(
                f"--resume: {path} already finished {step} iterations, and --warmup + --steps = {job.total_steps}; "
                "raise --steps to train further"
            )
    elif checkpoint.completed(root) and not force:
        raise UserError(
            f"--checkpoint-dir {root} already holds checkpoints; pass --resume to continue from the latest, another "
            "folder, or --force to write new checkpoints beside (and over) them"
        )


@app.callback(invoke_without_command=True)
def execute(
    ctx: typer.Context,
    workload: str | None = typer.Option(None, "--workload", "-w", help=WORKLOAD_HELP),
    cluster: str | None = typer.Option(None, "--cluster", "-c", help=CLUSTER_HELP),
    plan: str | None = typer.Option(None, "--plan", "-p", help=PLAN_HELP),
    nodes: int | None = typer.Option(None, "--nodes", "-n", help="Node count for a cluster of identical nodes."),
    devices_per_node: int | None = typer.Option(
        None, "--devices-per-node", help="Devices in every node (e.g. 4 ranks on cpu-local)."
    ),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Train at this sequence length instead."),
    steps: int = typer.Option(10, "--steps", min=1, help="Measured iterations (after the warm-up)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Iterations run first and left out of the timing median."),
    compare: bool = typer.Option(
        False, "--compare", help="Also predict the plan and show predicted vs measured with the error of each field."
    ),
    engine: str = typer.Option(
        "des", "--engine", "-e", help="Engine of the --compare prediction: des (discrete-event, default) or analytic."
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print JSON on stdout: the measured Report plus 'losses' and 'execution'; with --compare "
        "{'predicted': Report, 'measured': Report, 'losses': [...], 'execution': {...}}.",
    ),
    trace: Path | None = typer.Option(
        None,
        "--trace",
        help="Write rank 0's torch.profiler Chrome trace (*.json) of up to 3 measured iterations to this new file "
        "(profiling slows them).",
    ),
    checkpoint_dir: Path | None = typer.Option(
        None,
        "--checkpoint-dir",
        help="Save model, optimizer and data position with torch.distributed.checkpoint under this folder.",
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", min=1, help="Save every K iterations (default: once, at the end)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the latest checkpoint in --checkpoint-dir (same job only)."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Run a plan predicted not to fit in memory; replace an existing --trace file; write into a checkpoint "
        "folder that has checkpoints.",
    ),
    keep_last: int | None = typer.Option(
        None, "--keep-last", min=1, help="Keep only the newest N checkpoints (older ones are deleted after a save)."
    ),
    skip_nonfinite: bool = typer.Option(
        False,
        "--skip-nonfinite",
        help="Skip an iteration whose loss or gradient norm is NaN/inf (no optimizer step; counted in the Report) "
        "instead of stopping with exit status 4.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights, the synthetic data and dropout."),
    party: str | None = typer.Option(
        None,
        "--party",
        help="Federated workloads (vfl-wdl): run this party, active or passive; see `execute vfl run --help`.",
    ),
) -> None:
    """Run a training plan on real devices and measure it."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [
        name for name, value in (("--workload", workload), ("--cluster", cluster), ("--plan", plan)) if value is None
    ]
    if len(missing) == 3:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    if missing:
        raise UserError(f"missing {', '.join(missing)}; see `execute --help`")
    assert workload is not None and cluster is not None and plan is not None
    from workloads.vfl import is_vfl_workload

    if party is not None or is_vfl_workload(workload):
        from executor.vfl.cli import run_from_execute

        return run_from_execute(workload, cluster, plan, party)
    if engine not in ("des", "analytic"):
        raise UserError(f"--engine must be des or analytic, got {engine!r}")
    trace_path = _check_options(trace, checkpoint_dir, checkpoint_every, resume, force)
    _run(
        workload,
        cluster,
        plan,
        nodes,
        devices_per_node,
        seq_len,
        steps,
        warmup,
        compare,
        as_json,
        trace_path,
        checkpoint_dir,
        checkpoint_every,
        resume,
        force,
        seed,
        engine,
        keep_last=keep_last,
        skip_nonfinite=skip_nonfinite,
    )


def _predict(bound, engine: str):
    """The simulator's Report of the bound plan, with the chosen engine."""
    if engine == "analytic":
        from simulator.analytic import evaluate_bound

        return evaluate_bound(bound)
    from simulator.des import des_report
    from simulator.des.engine import Simulation

    return des_report(Simulation(bound).run())


def _run(
    workload,
    cluster,
    plan,
    nodes,
    devices_per_node,
    seq_len,
    steps,
    warmup,
    compare,
    as_json,
    trace_path,
    checkpoint_dir,
    checkpoint_every,
    resume,
    force,
    seed,
    engine="des",
    keep_last=None,
    skip_nonfinite=False,
) -> None:
    # Imported here so that `--help` answers without loading torch.
    from executor.checks import admit
    from executor.job import Job
    from executor.launch import RankFailure, run, under_torchrun
    from executor.render import render_comparison, render_measured
    from executor.results import extras, measured_report
    from hwmodel.catalog import cluster_names, load_cluster
    from simulator.plan import load_plan
    from workloads.catalog import load_workload

    cfg = load_workload(workload, seq_len)
    cluster_spec = load_cluster(cluster, nodes, devices_per_node)
    bound, device_type, warnings = admit(load_plan(plan), cfg, cluster_spec, force)
    job = Job(
        workload=cfg,
        cluster_ref=cluster,
        nodes=nodes,
        devices_per_node=devices_per_node,
        plan=bound.plan,
        steps=steps,
        warmup=warmup,
        seed=seed,
        device_type=device_type,
        checkpoint_dir=str(checkpoint_dir.resolve()) if checkpoint_dir else None,
        checkpoint_every=checkpoint_every,
        resume=resume,
        trace=trace_path,
        keep_last=keep_last,
        skip_nonfinite=skip_nonfinite,
    )
    leader = not under_torchrun() or int(os.environ.get("RANK", "0")) == 0
    _prepare_checkpoints(job, checkpoint_dir, force, leader)
    for warning in warnings:
        if leader:
            err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    try:
        result = _run_with_progress(job, run, leader)
    except RankFailure as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        from executor.runtime import NONFINITE_EXIT, NonFiniteError

        sys.exit(NONFINITE_EXIT if f"{NonFiniteError.__name__}:" in exc.cause else 1)
    if result is None:  # another torchrun rank: rank 0 reports
        return
    if trace_path is not None and Path(trace_path).exists():
        report_written(Path(trace_path), err)
    measured = measured_report(bound, result, warnings)
    more = extras(result)
    if compare:
        predicted = _predict(bound, engine)
        if as_json:
            print(
                json.dumps(
                    {
                        "predicted": predicted.model_dump(mode="json"),
                        "measured": measured.model_dump(mode="json"),
                        "losses": result.losses,
                        "execution": more,
                    },
                    indent=2,
                )
            )
        else:
            render_measured(measured, result.losses, result.first_step, result.device_name, out)
            render_comparison(predicted, measured, out)
            if device_type == "cpu" and cluster in cluster_names():
                # The catalog's CPU figures are a generic estimate; on CPUs they miss by tens of percent.
                out.print(
                    f"{cluster} describes a generic CPU core, not this machine: to predict this machine, run "
                    "`execute calibrate --out my-machine.yaml` once and pass `--cluster my-machine.yaml`.",
                    highlight=False,
                )
    elif as_json:
        print(json.dumps({**measured.model_dump(mode="json"), "losses": result.losses, "execution": more}, indent=2))
    else:
        render_measured(measured, result.losses, result.first_step, result.device_name, out)


def _prepare_checkpoints(job, checkpoint_dir: Path | None, force: bool, leader: bool) -> None:
    """Lock the checkpoint folder (the leading process only: torchrun's other ranks share its run), then
    check it; the lock comes first, so a second run on the folder stops before reading it."""
    if checkpoint_dir is None:
        return
    if leader and (checkpoint_dir.is_dir() or not job.resume):
        from executor import checkpoint

        checkpoint.lock(checkpoint_dir)
    _check_checkpoint_dir(job, force)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)


def _run_with_progress(job, run, leader: bool):
    """Run the job with a progress bar on stderr (iterations done, time of the last one)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    if not leader:
        return run(job)
    with progress_bar(
        err,
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
    ) as progress:
        label = f"{job.world_size} rank{'s' if job.world_size > 1 else ''}: starting"
        task = progress.add_task(label, total=job.total_steps, last="")

        def on_step(done: int, total: int, seconds: float) -> None:
            progress.update(task, completed=done, description="training", last=f"last iteration {seconds * 1e3:.1f} ms")

        return run(job, on_step)


def main() -> None:
    """Console entry point: user errors become a message and exit status 2, never a traceback.

    A process that was a torchrun rank leaves with os._exit once its output is flushed: the interpreter's own
    shutdown destroys gloo's worker threads in no fixed order, and that aborted a rank (SIGABRT) after a run
    that had finished, turning a good run into a failed one."""
    from executor.ranks import joined_a_group

    code = 0
    try:
        run_app(app, err)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if joined_a_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
