"""Run a stage module on one process or several, on one machine or several:
`python -m lmforge.train.launch [--nproc N] <module>` (head) | `... --join HOST:PORT [--node-rank R] <module>`.

N == 1 on one node: the module runs here, in this process (as `python -m <module>` would).
N > 1 on one node: this process becomes `python -m torch.distributed.run --standalone --nproc_per_node=N -m <module>`
(one process per GPU; the stage sets up its process group from torchrun's environment).
M > 1 nodes: this process is torchrun's agent for this node, with a rendezvous at HOST:PORT hosted by the
head (node rank 0, the node whose DVC stage runs this, so global rank 0 and every write are there); each
other node runs the same module with `--join HOST:PORT --node-rank R`. A node that never comes, or a
process that dies on any node, ends every node's launcher with one line naming the endpoint, not a traceback.
DVC's pretrain cmd goes through here: N, M and the join wait are `runtime.pretrain.nproc/nnodes/join_timeout_s`
read from the typed params; the endpoint and node rank from the environment (LMFORGE_RDZV_ENDPOINT,
LMFORGE_NODE_RANK) or the command line. None of them is interpolated into dvc.yaml's cmd, so no value
ever reaches a shell.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

ENDPOINT_ENV = "LMFORGE_RDZV_ENDPOINT"
NODE_RANK_ENV = "LMFORGE_NODE_RANK"
DEFAULT_PORT = 29500  # torchrun's
JOIN = "python -m lmforge.train.launch --join {endpoint} --node-rank {rank} {module}"


def command(module: str, nproc: int, args: list[str] | None = None) -> list[str]:
    """The torchrun command line for `nproc` > 1 processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *(args or [])]


@dataclass(frozen=True)
class Nodes:
    """This node's place in a run over `nnodes` machines of `nproc` processes each."""

    nnodes: int
    nproc: int
    endpoint: str  # HOST:PORT of the head's rendezvous store
    node_rank: int  # 0: the head
    join_timeout_s: int


def node_args(module: str, nodes: Nodes, args: list[str] | None = None) -> list[str]:
    """torchrun's arguments for one node of several.

    The static rendezvous, not c10d's: c10d numbers the nodes by sorting their host names and pids,
    so global rank 0 (which alone writes outputs, dvc.lock's files and MLflow) could land on a node
    whose checkout DVC never looks at. Static takes the node rank as given: the head is node 0. Its
    store waits `join_timeout_s` for the other nodes, and says how many came."""
    return [f"--nnodes={nodes.nnodes}", f"--nproc_per_node={nodes.nproc}", "--rdzv_backend=static",
            f"--rdzv_endpoint={nodes.endpoint}", f"--node_rank={nodes.node_rank}",
            f"--rdzv_conf=timeout={nodes.join_timeout_s}", "--max_restarts=0", "-m", module, *(args or [])]


def parse_endpoint(text: str) -> str:
    """`HOST:PORT` (or `HOST`, torchrun's port 29500), checked: a bad one is named before any wait."""
    from lmforge.core.errors import LmforgeError

    host, sep, port = text.strip().rpartition(":") if ":" in text else (text.strip(), "", str(DEFAULT_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LmforgeError(f"rendezvous endpoint {text!r} is not HOST:PORT (e.g. node0:{DEFAULT_PORT}): "
                           f"set {ENDPOINT_ENV} or --rdzv / --join")
    return f"{host}:{int(port)}"


def _runtime():
    from lmforge.core.params import load_params

    return load_params().runtime.pretrain


def plan(ns: argparse.Namespace, environ: dict[str, str]) -> Nodes | None:
    """Where this launcher sits: None for one node (today's path), else its Nodes. Raises LmforgeError."""
    from lmforge.core.errors import LmforgeError
    from lmforge.core.params import DEFAULT_PARAMS_PATH

    runtime = _runtime() if ns.nproc is None or (ns.nnodes is None and Path(DEFAULT_PARAMS_PATH).is_file()) else None
    nproc = ns.nproc if ns.nproc is not None else runtime.nproc
    # `--nproc N` where no params.yaml is (a module of one's own): one node, as before nnodes existed.
    nnodes = ns.nnodes if ns.nnodes is not None else runtime.nnodes if runtime is not None else 1
    if nproc < 1 or nnodes < 1:
        raise LmforgeError(f"--nproc and --nnodes must be >= 1 (got {nproc} and {nnodes})")
    if nnodes == 1:
        if ns.join:
            raise LmforgeError(f"--join {ns.join}: runtime.pretrain.nnodes is 1 in this checkout's params.yaml; "
                               "check out the head's commit (its params set nnodes)")
        ns.nproc = nproc
        return None
    joining = ns.join is not None
    raw = ns.join or ns.rdzv or environ.get(ENDPOINT_ENV)
    if not raw:
        raise LmforgeError(f"runtime.pretrain.nnodes is {nnodes}: this is the head node, so say where the others "
                           f"reach it: {ENDPOINT_ENV}=HOST:PORT (or --rdzv HOST:PORT), HOST this machine's name")
    endpoint = parse_endpoint(raw)
    rank_text = ns.node_rank if ns.node_rank is not None else environ.get(NODE_RANK_ENV)
    if not joining:
        if rank_text not in (None, "", "0"):
            raise LmforgeError(f"node rank {rank_text} without --join: the head (the DVC stage) is node 0; "
                               f"the others join with `{JOIN.format(endpoint=endpoint, rank='R', module=ns.module)}`")
        rank = 0
    elif rank_text in (None, "") and nnodes == 2:
        rank = 1  # the one other node
    else:
        if rank_text in (None, "") or not str(rank_text).isdigit() or not 0 < int(rank_text) < nnodes:
            raise LmforgeError(f"--join needs this node's rank, 1..{nnodes - 1} (--node-rank R or {NODE_RANK_ENV}; "
                               f"got {rank_text!r}): each joining node a different one")
        rank = int(rank_text)
    timeout = ns.join_timeout if ns.join_timeout is not None else (runtime or _runtime()).join_timeout_s
    return Nodes(nnodes=nnodes, nproc=nproc, endpoint=endpoint, node_rank=rank, join_timeout_s=timeout)


def failure_line(exc: BaseException, nodes: Nodes, module: str) -> str:
    """One line for what ended torchrun on this node: a node that never came, a head that never
    answered, or a process that failed (here, or on another node, which breaks this node's collectives)."""
    here = f"node {nodes.node_rank} of {nodes.nnodes}"
    text = str(exc)
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        came = int(joined.group(1))
        return (f"{came} of {nodes.nnodes} nodes joined the rendezvous at {nodes.endpoint} within "
                f"{nodes.join_timeout_s} s (runtime.pretrain.join_timeout_s): start each other node with "
                f"`{JOIN.format(endpoint=nodes.endpoint, rank='R', module=module)}` (R = 1..{nodes.nnodes - 1}) "
                "from a checkout at the same commit with the same shards")
    failures = getattr(exc, "failures", None)
    if failures:
        codes = ", ".join(f"rank {rank} exit code {failure.exitcode}" for rank, failure in sorted(failures.items()))
        return (f"{here}: the stage's processes here failed ({codes}); with several nodes a process that died on "
                f"any node ends the others' (rendezvous {nodes.endpoint}). The last checkpoint resumes the run: "
                "start it again on every node")
    if nodes.node_rank and re.search(r"timed out|timeout|connect|refused", text, re.IGNORECASE):
        return (f"{here} could not reach the head's rendezvous at {nodes.endpoint} within {nodes.join_timeout_s} s: "
                "start the head's stage first (`dvc repro pretrain` there), and check the name and port from here")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{here}, rendezvous {nodes.endpoint}: {type(exc).__name__}: {first}"


def run_nodes(module: str, nodes: Nodes, args: list[str]) -> int:
    """Be this node's torchrun agent, in this process (so its failures become one line); the exit status."""
    # The store's C++ log (each failed connect, with a stack of frames) would bury that line too: quiet
    # in this process, read when torch loads; the stage's processes get the environment as it was.
    before = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        from torch.distributed import run as torchrun
    finally:
        if before is None:
            del os.environ["TORCH_CPP_LOG_LEVEL"]
        else:
            os.environ["TORCH_CPP_LOG_LEVEL"] = before
    # The agent's own log lines (rendezvous details, each failure with a traceback) would repeat
    # what failure_line says once. Each of its modules sets its logger's level when imported (some
    # only once the agent runs), so the filter sits on torch's handlers, in this process only: the
    # stage's processes keep their own output.
    def agent_record(record: logging.LogRecord) -> bool:
        return not record.name.startswith("torch.distributed")

    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[:2] == ["torch", "distributed"] and isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                handler.addFilter(agent_record)
    try:
        torchrun.run(torchrun.parse_args(node_args(module, nodes, args)))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - the agent's errors (SignalException is a BaseException too)
        if isinstance(exc, SystemExit) and not exc.code:
            return 0
        print(f"[launch] error: {failure_line(exc, nodes, module)}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmforge.train.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes on this machine (one per GPU; default: runtime.pretrain.nproc in params.yaml)")
    parser.add_argument("--nnodes", type=int, default=None,
                        help="machines (default: runtime.pretrain.nnodes in params.yaml)")
    parser.add_argument("--rdzv", default=None, metavar="HOST:PORT",
                        help=f"head node: where the others reach it (default: ${ENDPOINT_ENV})")
    parser.add_argument("--join", default=None, metavar="HOST:PORT", help="join the head's rendezvous at HOST:PORT")
    parser.add_argument("--node-rank", default=None,
                        help=f"with --join: this node's rank, 1..nnodes-1 (default: ${NODE_RANK_ENV}; 1 of 2 nodes)")
    parser.add_argument("--join-timeout", type=int, default=None, metavar="S",
                        help="seconds to wait for the other nodes (default: runtime.pretrain.join_timeout_s)")
    parser.add_argument("module", help="the module to run, e.g. stages.pretrain")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the module")
    ns = parser.parse_args(argv)
    from lmforge.core.errors import LmforgeError

    try:
        nodes = plan(ns, dict(os.environ))
    except LmforgeError as exc:
        print(f"[launch] error: {exc}", file=sys.stderr)
        sys.exit(2)
    if nodes is None and ns.nproc == 1:
        sys.argv = [ns.module, *ns.args]
        runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
        return
    if (nodes.nproc if nodes is not None else ns.nproc) > 1:
        # torchrun gives each of several processes one OpenMP thread when none is set, with a banner on
        # the terminal saying so: the same choice made here, without the banner (a value set is kept).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if nodes is not None:
        sys.exit(run_nodes(ns.module, nodes, ns.args))
    cmd = command(ns.module, ns.nproc, ns.args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
