"""A picture of a discrete-event run: each representative's compute stream over time (Gantt) and
its memory over time, with matplotlib (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt

from simulator.des.records import DesResult

COLORS = {
    "forward": "#4C72B0",
    "backward": "#DD8452",
    "recompute": "#937860",
    "optimizer": "#55A868",
    "comm": "#C44E52",
    "zero3": "#8172B3",
    "reduce": "#DA8BC3",
    "p2p": "#8C8C8C",
}


def plot_timeline(result: DesResult, path: Path, title: str = "") -> None:
    """Save a Gantt chart of compute streams and a memory-over-time chart to `path` (PNG)."""
    reps = result.reps
    fig, (gantt, memory) = plt.subplots(
        2,
        1,
        figsize=(12, 2 + 0.45 * len(reps) + 3),
        sharex=True,
        gridspec_kw={"height_ratios": [max(2, 0.45 * len(reps)), 3]},
    )
    scale = 1e3  # milliseconds
    for row, rep in enumerate(reps):
        for category in COLORS:
            bars = [
                (e.start * scale, (e.end - e.start) * scale)
                for e in result.trace
                if e.rep == rep.index and e.track == "compute" and e.category == category
            ]
            if bars:
                gantt.broken_barh(bars, (row - 0.4, 0.8), facecolors=COLORS[category], label=category)
    gantt.set_yticks(range(len(reps)), [rep.label() for rep in reps])
    gantt.invert_yaxis()
    handles, labels = gantt.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    gantt.legend(unique.values(), unique.keys(), loc="upper right", fontsize="small", ncol=len(unique))
    gantt.set_title(title or "compute streams")
    for rep in reps:
        times = [t * scale for t, _ in rep.memory_events]
        values = [b / 2**30 for _, b in rep.memory_events]
        memory.step(times, values, where="post", label=rep.label())
    memory.set_ylabel("memory (GiB)")
    memory.set_xlabel("time in the iteration (ms)")
    if len(reps) <= 12:
        memory.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
