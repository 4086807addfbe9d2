"""Angel-PTM on one node: the largest model (max-model) and the throughput of a given model, each against
its physical bound, beside the baselines. Usage: python benchmarks/angel_ptm_bounds.py [cluster] [workload]"""

from __future__ import annotations

import sys

from hwmodel.catalog import load_cluster
from simulator.search.angel_ptm.search import AngelReport, search_angel
from simulator.search.angel_ptm.space import ladder_model
from workloads.catalog import load_workload


def main() -> None:
    cluster = load_cluster(sys.argv[1] if len(sys.argv) > 1 else "dgx-a100-40g")
    workload = load_workload(sys.argv[2] if len(sys.argv) > 2 else "gpt3-13b")
    # Throughput also at 65 ladder layers (~55B, the size Tencent reports on one 8x A100-40GB node): too big
    # for GPU memory alone, so placements differ.
    runs = [("max-model", workload), ("throughput", workload), ("throughput", ladder_model(workload, 65))]
    for objective, wl in runs:
        result = search_angel(wl, cluster, objective)
        rows: list[tuple[str, AngelReport | None, str]] = [("angel-ptm", result.best.report, "")]  # type: ignore[list-item]
        rows += [(b.name, b.report, b.reason or "") for b in result.baselines]  # type: ignore[misc]
        print(f"\n{objective} on {cluster.name} ({wl.name}{' family' if objective == 'max-model' else ''})")
        print(
            "| system | model | params (B) | capacity bound (B) | params/bound | samples/s | step s | bound s "
            "| step/bound |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r, why in rows:
            if r is None:
                print(f"| {name} | - | - | - | - | - | - | - | {why} |")
                continue
            print(
                f"| {name} | {r.model} | {r.params / 1e9:.1f} | {r.capacity_bound_params / 1e9:.1f} | "
                f"{r.params / r.capacity_bound_params:.3f} | {r.samples_per_s:.4g} | {r.step_s:.4g} | "
                f"{r.bound_s:.4g} | {r.step_s / r.bound_s:.3f} |"
            )
        best = result.best.report
        assert isinstance(best, AngelReport)
        others = [b.report for b in result.baselines if isinstance(b.report, AngelReport)]
        if objective == "max-model" and others:
            top = max(others, key=lambda r: r.params)
            print(
                f"angel-ptm vs largest baseline ({top.model}): {100 * (best.params / top.params - 1):+.1f}% params "
                "(published: +114.8%)"
            )
        if objective == "throughput" and others:
            top = max(others, key=lambda r: r.samples_per_s)
            print(
                f"angel-ptm vs fastest baseline: {100 * (best.samples_per_s / top.samples_per_s - 1):+.1f}% samples/s "
                "(published: +88.9%)"
            )


if __name__ == "__main__":
    main()
