"""Check the expert-placement simulator's step-time projection against the measured expert-parallel runs.

    PYTHONPATH=. python benchmarks/placement_validation.py

For every bench_parallel log of v7 (benchmarks/h200/*ep-v7*) that has the collectives timed alone, it
reads the 1-GPU step, the expert compute alone and the collective times, projects the fixed-exchange step
on that log's rank count (own rates) and on the other logs' rank counts (rates carried over, scaled by the
bytes each rank sends), and prints projected vs measured. Routing is taken as balanced (overload 1.0): the
bench runs an untrained softmax top-6 router over 64 experts and does not record its loads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from routerlab.analysis.placement import project_step_ms, rates_from_log
from routerlab.errors import ConfigError

LOGS = sorted((Path(__file__).parent / "h200").glob("*ep-v7*.txt"))


def main() -> None:
    parsed = []
    for log in LOGS:
        try:
            parsed.append((log.name, *rates_from_log(log)))
        except ConfigError as err:
            print(f"skipped {log.name}: {str(err).split(': ', 1)[1]}")
    measured = [(name, ranks, ms) for name, _, _, m in parsed for ranks, ms in m.items()]
    print("| rates from | projected run | ranks | measured ms | projected ms | error |")
    print("|---|---|--:|--:|--:|--:|")
    for source, shape, rates, _ in parsed:
        for target, ranks, ms in measured:
            p = project_step_ms([np.ones(shape.num_experts)], ranks, "contiguous", shape, rates)["step_ms"]
            print(f"| {source} | {target} | {ranks} | {ms:.2f} | {p:.2f} | {100 * (p / ms - 1):+.1f}% |")


if __name__ == "__main__":
    main()
