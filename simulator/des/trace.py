"""Chrome-trace (Perfetto / chrome://tracing) JSON of a discrete-event run.

One process per representative device (named after its stage, device type and how many ranks it
stands for), one thread per track: the compute stream, each link tier's collectives, pipeline sends;
a counter track of device memory. Times are microseconds from the start of the iteration.
"""

from __future__ import annotations

import json
from pathlib import Path

from simulator.des.records import DesResult

COMPUTE_TID = 0


def trace_events(result: DesResult) -> list[dict]:
    events: list[dict] = []
    tids: dict[tuple[int, str], int] = {}
    for rep in result.reps:
        events.append({"ph": "M", "name": "process_name", "pid": rep.index, "tid": 0, "args": {"name": rep.label()}})
        events.append(
            {"ph": "M", "name": "process_sort_index", "pid": rep.index, "tid": 0, "args": {"sort_index": rep.index}}
        )
        tids[(rep.index, "compute")] = COMPUTE_TID
        events.append(
            {"ph": "M", "name": "thread_name", "pid": rep.index, "tid": COMPUTE_TID, "args": {"name": "compute"}}
        )
    for event in result.trace:
        key = (event.rep, event.track)
        if key not in tids:
            tids[key] = len([k for k in tids if k[0] == event.rep])
            events.append(
                {"ph": "M", "name": "thread_name", "pid": event.rep, "tid": tids[key], "args": {"name": event.track}}
            )
        events.append(
            {
                "ph": "X",
                "name": event.name,
                "cat": event.category,
                "pid": event.rep,
                "tid": tids[key],
                "ts": event.start * 1e6,
                "dur": (event.end - event.start) * 1e6,
                "args": event.args,
            }
        )
    for rep in result.reps:
        for time, nbytes in rep.memory_events:
            events.append(
                {
                    "ph": "C",
                    "name": "memory",
                    "pid": rep.index,
                    "tid": 0,
                    "ts": time * 1e6,
                    "args": {"GiB": nbytes / 2**30},
                }
            )
    return events


def write_trace(result: DesResult, path: Path) -> None:
    """Write the trace as JSON (callers check that `path` may be written)."""
    path.write_text(json.dumps({"traceEvents": trace_events(result), "displayTimeUnit": "ms"}), encoding="utf-8")
