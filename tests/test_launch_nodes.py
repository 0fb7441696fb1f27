"""Several nodes from the same stage: launchers on 127.0.0.1 as the nodes of one run (the head through
`dvc repro`, the others with `--join`), the losses of one node's processes, only the head writing, and
the one line a node that never comes, or dies, ends the run with. The one node's reference run, of two
processes, is also the stage's multi-process run that one process resumes into the same MLflow run."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO, TINY_PARAMS, copy_repo, run, stage_runs, store_client, tool_env, write_params
from lmforge.core.errors import LmforgeError
from lmforge.train.curves import CurveLog
from lmforge.train.launch import ENDPOINT_ENV, Nodes, command, node_args, plan

LAUNCH = [sys.executable, "-m", "lmforge.train.launch"]
WAIT_S = 240  # bound on any one run here (they take seconds)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=tool_env(OMP_NUM_THREADS="1", **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def tree(process: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and its stage processes (torchrun starts each in a session of its own)."""
    try:
        parent = psutil.Process(process.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill(process: subprocess.Popen) -> None:
    """A node gone at once, as when its machine dies: every process of it, by PID."""
    for member in tree(process):
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def finished(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=WAIT_S)
    return process.returncode, err


def nodes_params(root: Path, **runtime: object) -> None:
    write_params(root, runtime={"pretrain": {**TINY_PARAMS["runtime"]["pretrain"], **runtime}})


def losses(root: Path) -> list[float]:
    """Each step's train loss as rank 0 logged it (JSON keeps the float's every bit; a step replayed
    after a resume: its latest)."""
    return [record["train_loss"] for record in CurveLog(root / "checkpoints/pretrain/curve.jsonl").read()]


def test_two_nodes_train_bitwise_as_one_node_of_two_resume_after_one_dies_and_only_the_head_writes(
        trained_ready, tmp_path):
    run_params = {"pretrain": {**TINY_PARAMS["pretrain"], "max_steps": 16, "eval_every": 0},
                  "runtime": {"pretrain": {**TINY_PARAMS["runtime"]["pretrain"], "checkpoint_every": 2}}}
    one_node = copy_repo(trained_ready, tmp_path / "one_node")
    write_params(one_node, **run_params)
    run(LAUNCH + ["--nproc", "2", "stages.pretrain"], one_node, OMP_NUM_THREADS="1")
    one_node_losses = losses(one_node)

    # One node of two processes logged one MLflow run (rank 0 alone). As if both had died after step 14:
    # one process resumes their sharded checkpoint and finishes that same run (same params). Right
    # after the run, while the workspace's tracking agent still waits for more: one agent, not two.
    (first,) = stage_runs(one_node, "pretrain")
    assert json.loads((one_node / "reports/pretrain/stats.json").read_text())["world_size"] == 2
    shutil.rmtree(one_node / "checkpoints/pretrain/step_00000016")
    assert "at step 14" in run([sys.executable, "-m", "stages.pretrain"], one_node).stderr
    (again,) = stage_runs(one_node, "pretrain")
    assert again.info.run_id == first.info.run_id
    steps = {m.step for m in store_client(one_node).get_metric_history(
        first.info.run_id, "pretrain/train_loss")}
    assert steps == set(range(1, 17))
    assert json.loads((one_node / "reports/pretrain/stats.json").read_text())["world_size"] == 1

    head, other = trained_ready, copy_repo(trained_ready, tmp_path / "node1")
    run_params["runtime"]["pretrain"].update(nnodes=2, join_timeout_s=WAIT_S)
    for root in (head, other):
        write_params(root, **run_params)
    # The other node has its own checkout and shards; only the checkpoints are one shared directory.
    (head / "checkpoints").mkdir(exist_ok=True)
    (other / "checkpoints").mkdir(exist_ok=True)
    (other / "checkpoints/pretrain").symlink_to(head / "checkpoints/pretrain", target_is_directory=True)
    checkpoints = head / "checkpoints/pretrain"

    # The other node dies after the first checkpoint: the head's process and launcher say so, one line each.
    endpoint = f"127.0.0.1:{free_port()}"
    stage = start(LAUNCH + ["stages.pretrain"], head, **{ENDPOINT_ENV: endpoint})
    joiner = start(LAUNCH + ["--join", endpoint, "stages.pretrain"], other)
    try:
        deadline = time.monotonic() + WAIT_S
        while not list(checkpoints.glob("step_*[0-9]")):
            assert stage.poll() is None and joiner.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        kill(joiner)
        status, err = finished(stage)
    finally:
        kill(stage)
        kill(joiner)
    saved = max(int(p.name.split("_")[1]) for p in checkpoints.glob("step_*[0-9]"))
    assert saved < 16, "the run finished before the node was killed"
    assert status == 1
    # The head's process: one line, not gloo's traceback, and exit status 1 (worth a retry; 2 is bad params).
    assert "Traceback" not in err
    assert "[pretrain] stopped: rank 0 of 2 lost the run's other processes (" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("[launch] error: node 0 of 2: the stage's processes here failed (rank 0 exit code 1)")
    assert endpoint in last and "start it again on every node" in last

    # Both again, the head's through DVC: the run resumes and ends where one node of two processes does.
    endpoint = f"127.0.0.1:{free_port()}"
    stage = start(["dvc", "repro", "--single-item", "pretrain"], head, **{ENDPOINT_ENV: endpoint})
    joiner = start(LAUNCH + ["--join", endpoint, "stages.pretrain"], other)
    try:
        (status, err), (joined, joined_err) = finished(stage), finished(joiner)
        assert status == 0 and joined == 0, err + joined_err
    finally:
        kill(stage)
        kill(joiner)
    assert f"at step {saved}" in err
    assert losses(head) == one_node_losses and len(losses(head)) == 16  # bitwise, every step
    assert json.loads((head / "reports/pretrain/stats.json").read_text())["world_size"] == 2
    assert "pretrain" in yaml.safe_load((head / "dvc.lock").read_text())["stages"]
    # Global rank 0 is the head's; the other node's first process (its local rank 0) wrote nothing of its own.
    for written in ("models/pretrain", "models/pretrain_hf", "reports/pretrain", "mlflow.db", "mlruns", "dvc.lock"):
        assert not (other / written).exists(), written


def test_a_node_that_never_joins_ends_the_head_within_the_wait_with_one_line(tmp_path):
    nodes_params(tmp_path, nnodes=2, join_timeout_s=2)
    endpoint = f"127.0.0.1:{free_port()}"
    head = start(LAUNCH + ["stages.pretrain"], tmp_path, **{ENDPOINT_ENV: endpoint})
    try:
        status, err = finished(head)
    finally:
        kill(head)
    assert status == 1
    assert err.strip().splitlines() == [
        f"[launch] error: 1 of 2 nodes joined the rendezvous at {endpoint} within 2 s (runtime.pretrain.join_timeout_s): "
        f"start each other node with `python -m lmforge.train.launch --join {endpoint} --node-rank R stages.pretrain` "
        "(R = 1..1) from a checkout at the same commit with the same shards"]


def test_a_node_whose_head_never_answers_stops_within_the_wait_with_one_line(tmp_path):
    nodes_params(tmp_path, nnodes=2, join_timeout_s=1)
    endpoint = f"127.0.0.1:{free_port()}"  # nobody listens
    joiner = start(LAUNCH + ["--join", endpoint, "stages.pretrain"], tmp_path)
    try:
        status, err = finished(joiner)
    finally:
        kill(joiner)
    assert status == 1
    assert err.strip().splitlines() == [
        f"[launch] error: node 1 of 2 could not reach the head's rendezvous at {endpoint} within 1 s: start the "
        "head's stage first (`dvc repro pretrain` there), and check the name and port from here"]


def test_nodes_without_a_shared_checkpoint_directory_stop_before_training(trained_ready, tmp_path):
    head, other = trained_ready, copy_repo(trained_ready, tmp_path / "node1")
    for root in (head, other):
        nodes_params(root, nnodes=2, join_timeout_s=WAIT_S)
    endpoint = f"127.0.0.1:{free_port()}"
    stage = start(LAUNCH + ["stages.pretrain"], head, **{ENDPOINT_ENV: endpoint})
    joiner = start(LAUNCH + ["--join", endpoint, "stages.pretrain"], other)
    try:
        (status, err), (_, joined_err) = finished(stage), finished(joiner)
    finally:
        kill(stage)
        kill(joiner)
    assert status == 1
    said = "[pretrain] error: checkpoints/pretrain is not the same directory on every node: rank(s) [1]"
    assert said in err and said in joined_err  # every rank stops, with the same line
    assert not (head / "checkpoints/pretrain/curve.jsonl").exists() and not (head / "models/pretrain").exists()


def _ns(**given: object) -> argparse.Namespace:
    values = {"nproc": 1, "nnodes": None, "rdzv": None, "join": None, "node_rank": None, "join_timeout": None,
              "module": "stages.pretrain", **given}
    return argparse.Namespace(**values)


def test_the_head_is_node_zero_of_a_static_rendezvous_and_one_node_stays_standalone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nodes_params(tmp_path, nnodes=3, nproc=4, join_timeout_s=30)
    head = plan(_ns(nproc=None), {ENDPOINT_ENV: "node0:1234"})
    assert head == Nodes(nnodes=3, nproc=4, endpoint="node0:1234", node_rank=0, join_timeout_s=30)
    assert node_args("stages.pretrain", head) == [
        "--nnodes=3", "--nproc_per_node=4", "--rdzv_backend=static", "--rdzv_endpoint=node0:1234", "--node_rank=0",
        "--rdzv_conf=timeout=30", "--max_restarts=0", "-m", "stages.pretrain"]
    assert plan(_ns(nproc=None, join="node0", node_rank="2"), {}).endpoint == "node0:29500"
    with pytest.raises(LmforgeError, match=f"{ENDPOINT_ENV}=HOST:PORT"):
        plan(_ns(nproc=None), {})
    with pytest.raises(LmforgeError, match=r"this node's rank, 1\.\.2"):
        plan(_ns(nproc=None, join="node0:1234"), {})  # three nodes: which one is this?
    with pytest.raises(LmforgeError, match="not HOST:PORT"):
        plan(_ns(nproc=None, join="node0:http"), {})
    nodes_params(tmp_path, nproc=2)
    assert plan(_ns(nproc=None), {ENDPOINT_ENV: "node0:1234"}) is None  # nnodes 1: --standalone, as before
    assert command("stages.pretrain", 2)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node=2", "-m"]


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "lmforge.train.launch" in line or "dvc repro" in line]


def test_the_slurm_and_kubernetes_recipes_run_the_stage_on_the_head_and_join_it_elsewhere():
    sbatch = REPO / "deploy/slurm/pretrain.sbatch"
    subprocess.run(["bash", "-n", str(sbatch)], check=True)
    text = sbatch.read_text()
    assert "srun" in text and "--ntasks-per-node=1" in text and ENDPOINT_ENV in text
    assert any("dvc repro pretrain" in line for line in _commands(text))
    assert any("python -m lmforge.train.launch --join" in line and "stages.pretrain" in line for line in _commands(text))
    job = yaml.safe_load((REPO / "deploy/k8s/pretrain-pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    scripts = {role: "\n".join(spec["template"]["spec"]["containers"][0]["args"]) for role, spec in specs.items()}
    assert "dvc repro pretrain" in scripts["Master"] and ENDPOINT_ENV in scripts["Master"]
    assert "python -m lmforge.train.launch --join" in scripts["Worker"] and "stages.pretrain" in scripts["Worker"]
    # The stage the head runs is the one dvc.yaml declares.
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert dvc["stages"]["pretrain"]["cmd"].split("#")[0].strip() == "python -m lmforge.train.launch stages.pretrain"


def test_the_flow_retries_a_run_that_lost_a_node_but_not_one_with_a_bad_setting():
    from flows.failures import is_deterministic

    lost = ["[pretrain] stopped: rank 0 of 2 lost the run's other processes (Connection reset by peer): a process "
            "or a node died. Start the stage again on every node; it resumes from its last checkpoint",
            "[launch] error: node 0 of 2: the stage's processes here failed (rank 0 exit code 1); ..."]
    assert not is_deterministic("pretrain", lost)
    assert is_deterministic("pretrain", ["[pretrain] error: checkpoints/pretrain is not the same directory on every "
                                         "node: rank(s) [1] do not see the run.json rank 0 wrote there. ..."])
