"""Run a stage module on one process or several: `python -m lmforge.train.launch [--nproc N] <module>`.

N == 1: the module runs here, in this process (as `python -m <module>` would).
N > 1: this process becomes `python -m torch.distributed.run --standalone --nproc_per_node=N -m <module>`
(one process per GPU; the stage sets up its process group from torchrun's environment).
DVC's pretrain cmd goes through here: without --nproc, N is `runtime.pretrain.nproc` read from the typed
params (never interpolated into dvc.yaml's cmd, so no param value ever reaches a shell).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def command(module: str, nproc: int, args: list[str] | None = None) -> list[str]:
    """The torchrun command line for `nproc` > 1 processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *(args or [])]


def _nproc_from_params() -> int:
    from lmforge.core.errors import LmforgeError
    from lmforge.core.params import load_params

    try:
        return load_params().runtime.pretrain.nproc
    except LmforgeError as exc:
        print(f"[launch] error: {exc}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmforge.train.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes on this machine (one per GPU; default: runtime.pretrain.nproc in params.yaml)")
    parser.add_argument("module", help="the module to run, e.g. stages.pretrain")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the module")
    ns = parser.parse_args(argv)
    if ns.nproc is None:
        ns.nproc = _nproc_from_params()
    if ns.nproc < 1:
        parser.error(f"--nproc must be >= 1 (got {ns.nproc})")
    if ns.nproc == 1:
        sys.argv = [ns.module, *ns.args]
        runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
        return
    cmd = command(ns.module, ns.nproc, ns.args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
