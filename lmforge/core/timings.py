"""Where a stage process's seconds go: start-up and imports, params, tracking, the engine's start,
hashing, publishing, and the work itself (the rest), so a fixed cost shows next to the work it
delays (`LMFORGE_TIMINGS=1 dvc repro` prints one line per stage; every stage run logs them to
MLflow as `timings/<phase>_s`).

Phases are timed where they happen (`with phase("engine"): ...`) and summed per process; `work`
is what the named phases leave of the stage's wall time, so the line always adds up."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

TIMINGS_ENV = "LMFORGE_TIMINGS"
# The named phases, in the order the line prints them; `work` is the rest of the wall time.
PHASES = ("startup", "params", "tracking", "engine", "hashing", "publish")

_seconds: dict[str, float] = {}
_open: list[str] = []  # the phase being timed (nested ones count in it)
_started: float | None = None  # perf_counter when the stage's main began
_startup: float | None = None  # seconds from the process's start to the stage's main


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as part of phase `name` (one of PHASES); nested phases count once, in the outer."""
    if name not in PHASES:
        raise ValueError(f"unknown timing phase {name!r}: one of {PHASES}")
    if _open:  # inside another phase: its time is already counted there
        yield
        return
    _open.append(name)
    started = time.perf_counter()
    try:
        yield
    finally:
        _open.pop()
        _seconds[name] = _seconds.get(name, 0.0) + time.perf_counter() - started


def stage_started() -> None:
    """Mark the start of the stage's main: what came before it (interpreter, imports) is `startup`."""
    global _started, _startup
    _seconds.clear()
    _started = time.perf_counter()
    _startup = process_age()


def stage_ended() -> None:
    """Stop the stage's clock: breakdown() is empty again (nothing more to log)."""
    global _started, _startup
    _seconds.clear()
    _started = _startup = None


def process_age() -> float | None:
    """Seconds since this process started; None where unknown. On Linux from /proc/self/stat's start
    tick against the boot clock, both counted from boot: psutil's create_time adds /proc/stat's boot
    time, which is whole seconds, so its age was up to a second too long."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()  # the name before ")" may hold spaces
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, AttributeError, ValueError, IndexError):  # not Linux
        pass
    import psutil

    try:
        return max(time.time() - psutil.Process(os.getpid()).create_time(), 0.0)
    except psutil.Error:
        return None


def breakdown() -> dict[str, float]:
    """The seconds of each phase so far, `work` the rest and `total` the process's wall (start-up
    included); empty before stage_started."""
    if _started is None:
        return {}
    wall = time.perf_counter() - _started
    named = {name: _seconds[name] for name in PHASES if name in _seconds}
    out = {"startup": _startup or 0.0, **named, "work": max(wall - sum(named.values()), 0.0)}
    out["total"] = (_startup or 0.0) + wall
    return {name: round(seconds, 3) for name, seconds in out.items()}


def wanted() -> bool:
    """Whether the stage prints its breakdown (LMFORGE_TIMINGS set to anything but 0/empty): on rank 0
    only when torchrun runs several processes (the others' lines would repeat it)."""
    return os.environ.get(TIMINGS_ENV, "") not in ("", "0") and os.environ.get("RANK", "0") == "0"


def line(stage: str) -> str:
    """`[stage] timings: startup 1.9 s · params 0.0 s · ... · work 0.4 s · total 4.7 s`."""
    parts = " · ".join(f"{name} {seconds:.1f} s" for name, seconds in breakdown().items())
    return f"[{stage}] timings: {parts}"
