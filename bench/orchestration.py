"""What orchestration costs when there is nothing to do: `dvc repro` with everything up to date,
the Prefect flow `lmforge-pipeline` with every stage cached, and a bare hello-world Prefect flow,
all on the same embedded (temporary local) Prefect server and the local MLflow store.

    python bench/orchestration.py [--rounds 5] [--repo DIR]

Makes a tiny repository (tests/conftest.py's make_repo) unless --repo names one, runs the pipeline
once to fill DVC's cache, then times interleaved rounds and prints the medians. Targets: dvc no-op
<= 1.5 s; all-cached flow <= 1.2x the hello-world flow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from lmforge import quiet_env  # noqa: E402

quiet_env()  # before Prefect is imported
os.environ.pop("MLFLOW_TRACKING_URI", None)  # the embedded default: the local store in the repo

from prefect import flow, task  # noqa: E402

from flows.pipeline import SKIPPED, pipeline  # noqa: E402


@task
def hello_task() -> str:
    return "hello"


@flow(name="hello-world")
def hello() -> str:
    return hello_task()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=None, help="a repository whose pipeline has run (else a tiny one)")
    args = parser.parse_args()
    if args.repo is None:
        from conftest import make_repo

        root = make_repo(Path(tempfile.mkdtemp(prefix="lmforge-bench-")))
        print(f"tiny repository {root}: first pipeline run ...", flush=True)
        state = pipeline(root=str(root), return_state=True)
        assert state.is_completed(), state.message
    else:
        root = args.repo.resolve()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def dvc_noop() -> None:
        out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr

    def cached_flow() -> None:
        result = pipeline(root=str(root))
        assert {s["status"] for s in result["stages"]} == {SKIPPED}, result["stages"]

    cases = {"dvc repro (nothing to do)": dvc_noop, "flow, all stages cached": cached_flow,
             "hello-world flow": hello}
    for fn in cases.values():  # warm-up: imports, the temporary server, DVC's caches
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["flow, all stages cached"] / medians["hello-world flow"]
    print(f"\n{'case':<28} {'median s':>9} {'min s':>7} {'max s':>7}   ({args.rounds} interleaved rounds)")
    for name, values in times.items():
        print(f"{name:<28} {medians[name]:9.3f} {min(values):7.3f} {max(values):7.3f}")
    noop = medians["dvc repro (nothing to do)"]
    print(f"\ndvc no-op {noop:.2f} s (target <= 1.5 s): {'ok' if noop <= 1.5 else 'MISSED'}")
    print(f"all-cached flow / hello-world flow = {ratio:.2f}x (target <= 1.2x): {'ok' if ratio <= 1.2 else 'MISSED'}")


if __name__ == "__main__":
    main()
