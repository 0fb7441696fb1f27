"""What the engine's memory hand-back costs a Dask worker per task: a full garbage collection after
each task (the worker's whole heap walked) against lmforge's `handing_back` (the heap before the task
frozen, only what the task made walked), side by side on the same embedded worker, in interleaved
rounds. The tasks are small, like a tiny corpus's partitions, so the hand-back is what shows.

    python bench/task_overhead.py                 # 3 rounds of 200 tasks each way
    python bench/task_overhead.py --tasks 50 --rounds 1   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow  # noqa: E402

from lmforge import quiet_env  # noqa: E402
from lmforge.core.params import EngineParams  # noqa: E402
from lmforge.data.engine import WorkerTask, dask_client  # noqa: E402


def small_task(seed: int) -> int:
    """A few thousand short-lived objects, some in reference cycles, as a small partition's task makes."""
    rows = [{"id": seed * 1000 + i, "text": f"document {i}", "parts": [i, str(i)]} for i in range(2000)]
    for row in rows[::10]:
        row["self"] = row  # a cycle only the collector frees
    return len(rows)


class FullCollection:
    """The alternative measured: `small_task`, then a full collection and pyarrow's pool trimmed."""

    def __call__(self, seed: int) -> int:
        try:
            return small_task(seed)
        finally:
            gc.collect()
            pyarrow.default_memory_pool().release_unused()


def worker_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def measure(client, task, tasks: int) -> tuple[float, float]:
    """(wall ms per task, worker CPU ms per task) for `tasks` tasks run by `task`."""
    before = sum(client.run(worker_cpu_s).values())
    started = time.perf_counter()
    futures = client.map(task, range(tasks), pure=False)
    assert sum(client.gather(futures)) == tasks * 2000
    wall = time.perf_counter() - started
    cpu = sum(client.run(worker_cpu_s).values()) - before
    return 1000 * wall / tasks, 1000 * cpu / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200, help="tasks per round and way")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    quiet_env()
    ways = {"full collection": FullCollection(), "handing_back (lmforge)": WorkerTask(small_task)}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    with dask_client(EngineParams(workers=1)) as client:
        client.gather(client.map(small_task, range(20), pure=False))  # the worker's imports, not timed
        for _ in range(args.rounds):
            for name, task in ways.items():
                results[name].append(measure(client, task, args.tasks))
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"1 embedded worker, {args.tasks} tasks x {args.rounds} rounds each way, interleaved\n")
    print("| after each task | wall ms per task (median) | worker CPU ms per task (median) |")
    print("| --- | ---: | ---: |")
    medians = {}
    for name, rounds in results.items():
        medians[name] = (statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds))
        print(f"| {name} | {medians[name][0]:.1f} | {medians[name][1]:.1f} |")
    full, ours = medians["full collection"], medians["handing_back (lmforge)"]
    print(f"\nfull / handing_back: {full[0] / ours[0]:.1f}x the wall, {full[1] / ours[1]:.1f}x the worker CPU")


if __name__ == "__main__":
    main()
