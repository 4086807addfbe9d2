"""Pipeline schedules: iteration time from per-stage forward/backward times.

With p stages, m micro-batches and per-stage times t_i = forward_i + backward_i per micro-batch:

- GPipe and 1F1B take sum_i t_i + (m - 1) * max_i t_i: the fill and drain cross every stage once, the
  steady state runs at the slowest stage. For equal stages this is (m + p - 1) * t, a bubble of
  (p - 1) / m.
- Interleaved 1F1B with v model chunks per device shrinks the fill and drain by v:
  m * max_i t_i + (sum_i t_i - max_i t_i) / v, i.e. a bubble of (p - 1) / (v * m) for equal stages.
"""

from __future__ import annotations


def pipeline_time(stage_times: list[float], num_micro_batches: int, schedule: str, virtual_stages: int) -> float:
    """Seconds from the first forward to the last backward of an iteration."""
    if not stage_times:
        return 0.0
    slowest = max(stage_times)
    total = sum(stage_times)
    m = num_micro_batches
    if schedule == "interleaved":
        return m * slowest + (total - slowest) / virtual_stages
    return total + (m - 1) * slowest


def finish_slack(stage: int, stage_backward: list[float], schedule: str, virtual_stages: int) -> float:
    """How long before the end of the pipeline stage `stage` runs its last backward.

    In 1F1B the first stage finishes last; stage i finishes about the backward time of stages < i
    earlier. Data-parallel gradient reduction of a stage can use that slack.
    """
    slack = sum(stage_backward[:stage])
    return slack / virtual_stages if schedule == "interleaved" else slack
