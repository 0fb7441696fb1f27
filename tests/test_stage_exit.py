"""A stage's own process ends without Python's teardown (lmforge.core.stage.exit_process), yet as
Python's exit would: its status, its atexit handlers, its threads, its temporary directories."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import tool_env

REPO = Path(__file__).resolve().parents[1]
STAGE = """
    import atexit, sys, tempfile, threading, time
    from pathlib import Path
    from lmforge.core.errors import LmforgeError
    from lmforge.core.stage import run_stage

    def main():
        kept = tempfile.TemporaryDirectory(dir=".")  # removed by its weakref.finalize at exit
        Path("tmpdir.txt").write_text(kept.name)
        atexit.register(lambda: Path("atexit.txt").write_text("ran"))
        def late():
            time.sleep(0.3)
            Path("thread.txt").write_text("joined")
        threading.Thread(target=late).start()  # not a daemon: the exit waits for it
        print("buffered, never flushed by the stage", end="")
        main.kept = kept
        if sys.argv[1] == "fail":
            raise LmforgeError("bad param x.y: set it to 1")

    if __name__ == "__main__":
        run_stage("probe", main)
        Path("after.txt").write_text("run_stage returned")
"""


@pytest.mark.parametrize(("how", "status"), [("ok", 0), ("fail", 2)])
def test_a_stage_process_exits_with_its_status_after_its_handlers_threads_and_temp_dirs(tmp_path, how, status):
    (tmp_path / "probe_stage.py").write_text(textwrap.dedent(STAGE))
    done = subprocess.run([sys.executable, "probe_stage.py", how], cwd=tmp_path, capture_output=True, text=True,
                          env=tool_env(PYTHONPATH=str(REPO)), timeout=60)
    assert done.returncode == status, done.stderr
    assert done.stdout == "buffered, never flushed by the stage"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "joined"
    assert not (tmp_path / (tmp_path / "tmpdir.txt").read_text()).exists()
    assert not (tmp_path / "after.txt").exists()  # the process ended in run_stage
    assert ("[probe] error: bad param x.y: set it to 1" in done.stderr) == (how == "fail")


def test_run_stage_called_from_another_module_returns_or_raises_system_exit():
    from lmforge.core.errors import LmforgeError
    from lmforge.core.stage import run_stage

    ran = []
    run_stage("probe", lambda: ran.append(1))  # a lambda defined here: this module, not __main__
    assert ran == [1]

    def fail() -> None:
        raise LmforgeError("no")

    with pytest.raises(SystemExit) as exited:
        run_stage("probe", fail)
    assert exited.value.code == 2
