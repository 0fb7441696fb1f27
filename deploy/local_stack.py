"""The team's stack on one machine, on 127.0.0.1 with free ports, each service a real process whose
PID is recorded: S3-compatible storage, an MLflow server (SQL store, artifacts in the bucket, served
to clients), a Prefect server, a `process` work pool and one worker. Run it as `deploy/local-stack`.

    deploy/local-stack up | down | status | env      [--dir DIR (default .stack/, or LMFORGE_STACK_DIR)]

The storage here is moto's S3 server (no MinIO is installable on this machine); nothing else in the
project knows that: clients get an endpoint URL and keys from the environment, as with real S3. Its
objects live in memory, so `down` forgets them while the MLflow and Prefect databases stay in DIR
(after the next `up`, earlier MLflow runs point at artifacts that are gone; remove DIR to start clean).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOL = "lmforge"  # the work pool of prefect.yaml's deployments
REMOTE = "lmforge"  # the DVC remote's name in .dvc/config.local
ARTIFACTS_BUCKET = "lmforge-artifacts"
DVC_BUCKET = "lmforge-dvc"
REGION = "us-east-1"
START_TIMEOUT_S = 120.0  # per service; a Prefect server takes ~10 s on an idle 2-core machine
STOP_GRACE_S = 15.0
STATE = "stack.json"  # PIDs, ports and the storage keys (mode 0600: it holds the secret key)
SERVICES = ("s3", "mlflow", "prefect", "worker")  # start order; `down` stops them in reverse


class StackError(RuntimeError):
    """A failure with its message first; the CLI prints it as one `error:` line."""


# ------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None: no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: clock ticks after boot


def ours(record: dict) -> bool:
    """Whether the recorded leader is still the process `up` started: alive, not a zombie, and
    started when it was (a PID reused after a reboot is someone else's)."""
    fields = _stat(record["pid"])
    return bool(fields) and fields[0] != "Z" and int(fields[19]) == record["started"]


def foreign(record: dict) -> bool:
    """Whether the recorded PID now names another process. Its group is then gone too: Linux gives
    no new process a PID still in use as a process group id."""
    fields = _stat(record["pid"])
    return bool(fields) and fields[0] != "Z" and int(fields[19]) != record["started"]


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (servers fork workers into their group)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def start(name: str, cmd: list[str], env: dict[str, str], home: Path) -> dict:
    """Start `cmd` in its own process group (so that `down` stops its children too), output to
    DIR/logs/<name>.log; returns its record (pid, log)."""
    log = home / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return {"pid": process.pid, "started": start_time(process.pid), "log": str(log)}


def wait_for(what: str, ready: Callable[[], bool], record: dict, timeout: float = START_TIMEOUT_S) -> None:
    """Poll `ready` until it holds; a process that died or a timeout is an error naming its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not ours(record):
            raise StackError(f"{what} exited before it was ready: see {record['log']}\n{tail(record['log'])}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not answering yet
            pass
        time.sleep(0.5)
    raise StackError(f"{what} not ready after {timeout:.0f} s: see {record['log']}\n{tail(record['log'])}")


def tail(log: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(records: list[dict]) -> None:
    """SIGTERM to each service's process group at once, SIGKILL to those left after STOP_GRACE_S."""
    records = [r for r in records if not foreign(r)]
    for signum, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        for record in records:
            try:
                os.killpg(record["pid"], signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(group_alive(r["pid"]) for r in records) and time.monotonic() < deadline:
            time.sleep(0.2)
        records = [r for r in records if group_alive(r["pid"])]
        if not records:
            return


def http_ok(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=2).status_code == 200


# ----------------------------------------------------------------------------------------- state


def read_state(home: Path) -> dict | None:
    path = home / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StackError(f"{path} cannot be read ({exc}): stop the stack's processes by hand (their logs are in "
                         f"{home / 'logs'}), then remove it") from None


def write_state(home: Path, state: dict) -> None:
    """Atomically, readable by the owner only (the storage's secret key is in it)."""
    path = home / STATE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=2)
    os.replace(tmp, path)


def client_env(state: dict) -> dict[str, str]:
    """What a shell (a developer's, a worker's) needs to use the stack: `env` prints these."""
    return {
        "PREFECT_API_URL": state["services"]["prefect"]["url"],
        "MLFLOW_TRACKING_URI": state["services"]["mlflow"]["url"],
        **storage_env(state),
        "LMFORGE_DVC_REMOTE": REMOTE,
        "LMFORGE_DVC_REMOTE_URL": f"s3://{DVC_BUCKET}/lmforge",
    }


def base_env() -> dict[str, str]:
    """This environment, with telemetry off and this interpreter's tools first on PATH."""
    env = dict(os.environ)
    env.update(DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # the stack's own, not an outer one's
        env.pop(key, None)
    return env


# ---------------------------------------------------------------------------------------- up/down


def up(home: Path, repo: Path) -> dict:
    """Start every service, create the buckets, the pool and the repo's DVC remote; on any failure
    stop what was started and raise."""
    existing = read_state(home)
    if existing and any(ours(s) for s in existing["services"].values()):
        raise StackError(f"a stack is already up in {home}: `deploy/local-stack status`, or `down` first")
    home.mkdir(parents=True, exist_ok=True)
    state = {"dir": str(home), "repo": str(repo), "services": {},
             "keys": {"access_key_id": f"lmforge-{secrets.token_hex(4)}",
                      "secret_access_key": secrets.token_urlsafe(24)}}
    services = state["services"]
    py = sys.executable
    configure = None
    try:
        # The three servers start at once (the MLflow server needs the bucket only when a client
        # uploads); the pool and the worker need the Prefect server.
        ports = {name: free_port() for name in ("s3", "mlflow", "prefect")}
        services["s3"] = start("s3", [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])],
                               base_env(), home)
        services["s3"].update(port=ports["s3"], url=f"http://127.0.0.1:{ports['s3']}")
        (home / "mlflow").mkdir(exist_ok=True)
        services["mlflow"] = start("mlflow", [
            py, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", f"s3://{ARTIFACTS_BUCKET}/mlflow",
        ], base_env() | storage_env(state), home)
        services["mlflow"].update(port=ports["mlflow"], url=f"http://127.0.0.1:{ports['mlflow']}")
        services["prefect"] = start("prefect", [py, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                                "--port", str(ports["prefect"])],
                                    base_env() | {"PREFECT_HOME": str(home / "prefect")}, home)
        services["prefect"].update(port=ports["prefect"], url=f"http://127.0.0.1:{ports['prefect']}/api")
        write_state(home, state)
        env = base_env() | client_env(state) | {"PREFECT_HOME": str(home / "prefect")}
        # The repo's DVC remote only needs the URLs: written while the servers start.
        configure = subprocess.Popen([py, "-m", "flows.remote", "configure"], cwd=repo, text=True,
                                     env=env | {"PYTHONPATH": str(ROOT)},  # this stack's code, whatever `repo` is
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for("S3 storage", lambda: listening(ports["s3"]), services["s3"])
        create_buckets(storage_env(state))
        wait_for("the MLflow server", lambda: http_ok(f"{services['mlflow']['url']}/health"), services["mlflow"])
        wait_for("the Prefect server", lambda: http_ok(f"{services['prefect']['url']}/health"), services["prefect"])
        worker_dir, worker_name = home / "worker", f"lmforge-{secrets.token_hex(4)}"
        worker_dir.mkdir(exist_ok=True)
        # `--type process` creates the pool when it does not exist yet.
        services["worker"] = start("worker", [py, "-m", "prefect", "worker", "start", "--pool", POOL,
                                              "--type", "process", "--name", worker_name],
                                   env | {"LMFORGE_WORKER_DIR": str(worker_dir)}, home)
        services["worker"].update(pool=POOL, name=worker_name, workdir=str(worker_dir),
                                  url=f"{services['prefect']['url']} (pool {POOL})")
        write_state(home, state)
        wait_for("the Prefect worker", lambda: worker_online(services["prefect"]["url"], worker_name),
                 services["worker"])
        try:
            output, _ = configure.communicate(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise StackError(f"`python -m flows.remote configure` did not finish in {START_TIMEOUT_S:.0f} s "
                             f"in {repo}") from None
        if configure.returncode != 0:
            raise StackError(f"`python -m flows.remote configure` failed in {repo}:\n{output.strip()[-2000:]}")
    except BaseException:
        if configure is not None and configure.poll() is None:
            configure.kill()
            configure.wait()
        down(home, quiet=True)
        raise
    return state


def storage_env(state: dict) -> dict[str, str]:
    """The storage's part of client_env: what the MLflow server and DVC need to reach it."""
    keys, url = state["keys"], state["services"]["s3"]["url"]
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": keys["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": keys["secret_access_key"], "AWS_DEFAULT_REGION": REGION}


def create_buckets(env: dict[str, str]) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=REGION)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in (ARTIFACTS_BUCKET, DVC_BUCKET):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)


def worker_online(api: str, name: str) -> bool:
    """Whether the worker `name` polls the pool (names are new per `up`: the Prefect database keeps
    earlier stacks' workers)."""
    import httpx

    response = httpx.post(f"{api}/work_pools/{POOL}/workers/filter", json={}, timeout=2)
    return response.status_code == 200 and any(w.get("name") == name and w.get("status") == "ONLINE"
                                               for w in response.json())


def down(home: Path, quiet: bool = False) -> list[str]:
    """Stop every service of the stack by its PID, in reverse start order, and verify that none
    is left running or listening. Returns the names stopped."""
    state = read_state(home)
    if state is None:
        if not quiet:
            print(f"no stack in {home}")
        return []
    # The worker first (no run starts on a stack going down), then the servers together.
    stopped = [name for name in reversed(SERVICES) if name in state["services"]]
    if "worker" in state["services"]:
        stop([state["services"]["worker"]])
    stop([state["services"][name] for name in stopped if name != "worker"])
    left = [f"{name} (pid {r['pid']})" for name, r in state["services"].items()
            if not foreign(r) and group_alive(r["pid"])]
    deadline = time.monotonic() + 10
    busy = [name for name, r in state["services"].items() if r.get("port") and listening(r["port"])]
    while busy and time.monotonic() < deadline:
        time.sleep(0.5)
        busy = [name for name, r in state["services"].items() if r.get("port") and listening(r["port"])]
    if left or busy:
        raise StackError(f"could not stop {', '.join(left)}; still listening: {', '.join(busy) or 'none'}")
    (home / STATE).unlink(missing_ok=True)
    return stopped


def status(home: Path) -> int:
    """One line per service: up or down, with its URL; exit status 0 when all are up."""
    state = read_state(home)
    if state is None:
        print(f"no stack in {home}: `deploy/local-stack up`")
        return 1
    all_up = True
    for name in SERVICES:
        record = state["services"].get(name)
        if record is None:
            print(f"{name:<8} not started")
            all_up = False
            continue
        up_now = ours(record) and (not record.get("port") or listening(record["port"]))
        all_up = all_up and up_now
        print(f"{name:<8} {'up' if up_now else 'DOWN':<5} {record['url']}  (pid {record['pid']}, log {record['log']})")
    print(f"dvc      remote `{REMOTE}` = s3://{DVC_BUCKET}/lmforge (in {state['repo']}/.dvc/config.local)")
    return 0 if all_up else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/local-stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("LMFORGE_STACK_DIR", ROOT / ".stack")),
                        help="where the stack keeps its data, logs and PIDs (default .stack/ in the repository)")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose DVC remote `up` configures")
    args = parser.parse_args(argv)
    home = args.dir.resolve()
    try:
        if args.command == "up":
            state = up(home, args.repo.resolve())
            status(home)
            print(f"\nuse it from a shell: eval \"$(deploy/local-stack env{'' if home == ROOT / '.stack' else f' --dir {home}'})\"")
            return 0 if state else 1
        if args.command == "down":
            stopped = down(home)
            if stopped:
                print(f"stopped {', '.join(stopped)}; nothing of the stack is listening (data kept in {home})")
            return 0
        if args.command == "status":
            return status(home)
        state = read_state(home)
        if state is None:
            raise StackError(f"no stack in {home}: `deploy/local-stack up` first")
        # The keys are printed because this command's job is to hand them to the user's shell.
        for key, value in client_env(state).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
