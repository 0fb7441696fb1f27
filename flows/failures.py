"""What a failed stage's output says: its own error line, and whether a retry could fix it.

`dvc repro` exits 255 whatever its stage's status, so the flow reads the output: the stage's own
`[stage] error:` line, DVC's ERROR line, torchrun's per-rank tracebacks, a kill by a signal.
Pure functions over the output's lines (flows.pipeline's stage task calls them).
"""

from __future__ import annotations

import re


def error_line(stage: str, lines: list[str]) -> str:
    """The stage's own error line: `[stage] error: ...`, else the exception that ended its
    traceback, else DVC's ERROR line."""
    own = [line for line in lines if re.match(rf"^\[{re.escape(stage)}\] error:", line)]
    if own:
        return own[-1]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            tail = [line for line in lines[i + 1:] if line and not line.startswith((" ", "\t", "ERROR:"))]
            if tail:
                return tail[-1] if ":" in tail[-1] else tail[0]
    dvc = [line for line in lines if line.startswith("ERROR:")]
    return dvc[0] if dvc else (lines[-1] if lines else "no output")


# Exceptions a retry cannot fix: a path that is wrong or a bug, raised the same way on every attempt.
# Anything else that ends a stage (killed, out of memory, NCCL/CUDA, a connection) may pass next time.
SAME_EVERY_TIME = frozenset({
    "NotADirectoryError", "IsADirectoryError", "FileExistsError", "FileNotFoundError", "PermissionError",
    "KeyError", "IndexError", "TypeError", "ValueError", "AttributeError", "NameError", "ImportError",
    "ModuleNotFoundError", "SyntaxError", "AssertionError", "ZeroDivisionError", "NotImplementedError",
    "RecursionError", "UnicodeDecodeError", "UnicodeEncodeError", "JSONDecodeError",
})
WRAPPERS = frozenset({"ChildFailedError"})  # torchrun's report that a rank failed; the rank's own comes first
_RANK_PREFIX = re.compile(r"^\[(?:default)?rank\d+\]:\s?")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")
# Killed by a signal (the OOM killer, a preempted machine): DVC's `exited with -9` (or 128 + 9 through
# a shell), torchrun's `exitcode  : -9` for a rank.
_KILLED = re.compile(r"exited with (-\d+|129|1[3-5]\d)\s*$|exitcode\s*:\s*-\d+")


def _raised(lines: list[str]) -> list[str]:
    """The exception type ending each Python traceback in the output ('NotADirectoryError'), in order."""
    names = []
    plain = [_RANK_PREFIX.sub("", line) for line in lines]
    for i, line in enumerate(plain):
        if line.startswith("Traceback (most recent call last)"):
            end = next((m for m in map(_EXCEPTION.match, plain[i + 1:]) if m), None)
            if end is not None:
                names.append(end.group(1).rsplit(".", 1)[-1])
    return names


def is_deterministic(stage: str, lines: list[str]) -> bool:
    """Whether the stage failed in a way a retry cannot fix. `dvc repro` exits 255 whatever its
    stage's status, so the output tells: the stage's own `[stage] error:` line (lmforge.core.stage prints it
    for bad params or input, before exit status 2; under torchrun, which exits 1, it is still there),
    DVC's `exited with 2`, or a traceback ending in an exception of SAME_EVERY_TIME (a stage killed by
    a signal, out of memory, or failing on a connection or NCCL is retried)."""
    own = re.compile(rf"^\[{re.escape(stage)}\] error:")
    if any(own.match(line) or (line.startswith("ERROR:") and line.rstrip().endswith("exited with 2"))
           for line in lines):
        return True
    if any(_KILLED.search(line) for line in lines):  # whatever it printed before
        return False
    raised = [name for name in _raised(lines) if name not in WRAPPERS]
    return bool(raised) and raised[-1] in SAME_EVERY_TIME
