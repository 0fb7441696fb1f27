"""The team's stack on one machine, on 127.0.0.1 with free ports, each service a real process whose
PID is recorded: S3-compatible storage, an MLflow server (SQL store, artifacts in the bucket, served
to clients), a Prefect server, a `process` work pool and one worker. Run it as `deploy/local-stack`.

    deploy/local-stack up | down | status | env      [--dir DIR (default .stack/, or LMFORGE_STACK_DIR)]

Each server takes a free port, or the one LMFORGE_STACK_<S3|MLFLOW|PREFECT>_PORT names. The checkout's
DVC remote (.dvc/config.local) points at the stack only once every service is up, and `down` puts back
what was there before; a remote already pointing at another stack that is up is left alone.

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
SERVERS = ("s3", "mlflow", "prefect")  # the services with a port
PORT_ENV = "LMFORGE_STACK_{}_PORT"  # a fixed port for a server instead of a free one


class StackError(RuntimeError):
    """A failure with its message first; the CLI prints it as one `error:` line."""


# ------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choose_ports() -> dict[str, int]:
    """Each server's port: LMFORGE_STACK_<NAME>_PORT when set, else a free one. Another process may
    take a free port before the server binds it: the server then exits, and wait_for says so."""
    ports = {}
    for name in SERVERS:
        fixed = os.environ.get(PORT_ENV.format(name.upper()), "").strip()
        if fixed and not (fixed.isdigit() and 0 < int(fixed) < 65536):
            raise StackError(f"{PORT_ENV.format(name.upper())}={fixed!r} is not a port number (1-65535)")
        ports[name] = int(fixed) if fixed else free_port()
    return ports


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
        offset = out.tell()  # where this start's lines begin (earlier runs' stay above)
        process = subprocess.Popen(cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return {"pid": process.pid, "started": start_time(process.pid), "log": str(log), "log_offset": offset}


def wait_for(what: str, ready: Callable[[], bool], record: dict, timeout: float = START_TIMEOUT_S) -> None:
    """Poll `ready` (an answer only this service gives, not merely an open port: another process may
    hold it) until it holds, then mark the record ready. A process that exited (a port taken before
    it could bind it, ...) or a timeout is one error naming the service, its port and its own last
    log line."""
    where = f" on 127.0.0.1:{record['port']}" if record.get("port") else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not ours(record):
            raise StackError(f"{what} exited before it was ready{where}: {last_line(record)}\n"
                             f"(its log: {record['log']})")
        try:
            if ready():
                record["ready"] = True
                return
        except Exception:  # noqa: BLE001 - not answering yet
            pass
        time.sleep(0.5)
    raise StackError(f"{what} not ready{where} after {timeout:.0f} s: {last_line(record)}\n"
                     f"(its log: {record['log']})")


def last_line(record: dict) -> str:
    """The service's own word on why it stopped: the last line of this start's log that reports an
    error (uvicorn logs its shutdown after the bind error), else its last line."""
    try:
        with open(record["log"], "rb") as log:
            log.seek(record.get("log_offset", 0))
            text = log.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "in use" in line.lower()]
    return (errors or lines or ["(its log is empty)"])[-1]


def stop(records: list[dict]) -> None:
    """SIGTERM to each service's process group at once, again to those left after a second (Prefect's
    worker turns the first into a SIGINT for itself and waits out its own shutdown: the second one
    ends it; uvicorn takes it as "quit now"), SIGKILL to those left after STOP_GRACE_S."""
    records = [r for r in records if not foreign(r)]
    for signum, grace in ((signal.SIGTERM, 1.0), (signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
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


# MLflow 3's server runs GenAI jobs (scorers, trace roll-ups) in seven worker processes it starts
# with it, each importing MLflow (~3 s of CPU, ~250 MB): nothing lmforge logs uses them.
MLFLOW_SERVER_LEAN = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


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
    """Start every service, create the buckets and the pool, then (every service up) point the
    repo's DVC remote at the stack; on any failure stop what was started, put the remote back, and
    raise the failure itself."""
    existing = read_state(home)
    if existing and any(ours(s) for s in existing["services"].values()):
        raise StackError(f"a stack is already up in {home}: `deploy/local-stack status`, or `down` first")
    if existing:  # what a killed `up` left: its records cleaned, the remote it changed put back
        down(home)
    home.mkdir(parents=True, exist_ok=True)
    state = {"dir": str(home), "repo": str(repo), "services": {},
             "keys": {"access_key_id": f"lmforge-{secrets.token_hex(4)}",
                      "secret_access_key": secrets.token_urlsafe(24)}}
    services = state["services"]
    py = sys.executable
    try:
        # The three servers start at once (the MLflow server needs the bucket only when a client
        # uploads); the pool and the worker need the Prefect server.
        ports = choose_ports()
        services["s3"] = start("s3", [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])],
                               base_env(), home)
        services["s3"].update(port=ports["s3"], url=f"http://127.0.0.1:{ports['s3']}")
        write_state(home, state)  # from here on, `down` finds every process started
        (home / "mlflow").mkdir(exist_ok=True)
        services["mlflow"] = start("mlflow", [
            py, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", f"s3://{ARTIFACTS_BUCKET}/mlflow",
        ], base_env() | storage_env(state) | MLFLOW_SERVER_LEAN, home)
        services["mlflow"].update(port=ports["mlflow"], url=f"http://127.0.0.1:{ports['mlflow']}")
        write_state(home, state)
        services["prefect"] = start("prefect", [py, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                                "--port", str(ports["prefect"])],
                                    base_env() | {"PREFECT_HOME": str(home / "prefect")}, home)
        services["prefect"].update(port=ports["prefect"], url=f"http://127.0.0.1:{ports['prefect']}/api")
        write_state(home, state)
        env = base_env() | client_env(state) | {"PREFECT_HOME": str(home / "prefect")}

        def wait_for_server(name: str, what: str, path: str) -> None:
            wait_for(what, lambda: http_ok(f"{services[name]['url']}{path}"), services[name])
            write_state(home, state)  # marked ready: `down` then knows the port was its own

        wait_for_server("s3", "S3 storage", "/moto-api/")  # moto's own page: an open port may be another's
        create_buckets(storage_env(state))
        wait_for_server("mlflow", "the MLflow server", "/health")
        wait_for_server("prefect", "the Prefect server", "/health")
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
        write_state(home, state)
        point_remote(home, state, env)  # only now: every service is up
    except BaseException as exc:
        _, problems = down(home)
        if problems and isinstance(exc, StackError):
            raise StackError(f"{exc}\nand stopping the rest: {'; '.join(problems)}") from None
        raise
    return state


# ------------------------------------------------------------------------------------ DVC remote


def local_config(repo: Path) -> Path:
    return repo / ".dvc" / "config.local"


def remote_endpoint(repo: Path) -> str | None:
    """The endpoint URL of the remote REMOTE in the repo's .dvc/config.local (None: none set)."""
    from configobj import ConfigObj  # DVC's own config reader

    config = local_config(repo)
    if not config.is_file():
        return None
    return (ConfigObj(str(config)).get(f'remote "{REMOTE}"') or {}).get("endpointurl")


def another_stack(endpoint: str | None, ours_url: str) -> bool:
    """Whether `endpoint` is another local stack's storage that answers now (loopback, not ours)."""
    from urllib.parse import urlparse

    if not endpoint or endpoint.rstrip("/") == ours_url:
        return False
    parsed = urlparse(endpoint)
    return parsed.hostname in ("127.0.0.1", "localhost") and bool(parsed.port) and listening(parsed.port)


def point_remote(home: Path, state: dict, env: dict[str, str]) -> None:
    """Make the bucket the default DVC remote of the repo (`python -m flows.remote configure`, in
    .dvc/config.local), remembering the file as it was for `down`; but leave a remote that points at
    another stack that is up alone (say so: `env` still hands this stack's remote to a shell)."""
    repo = Path(state["repo"])
    config = local_config(repo)
    endpoint = remote_endpoint(repo)
    if another_stack(endpoint, state["services"]["s3"]["url"]):
        state["dvc"] = {"left": endpoint}
        write_state(home, state)
        print(f"note: {config} left as it is: its remote `{REMOTE}` points at {endpoint}, another stack that is "
              f"up. For this one: eval \"$(deploy/local-stack env --dir {home})\" && python -m flows.remote configure")
        return
    state["dvc"] = {"before": config.read_text() if config.is_file() else None, "written": None}
    write_state(home, state)  # before the change: a failure below is undone by `down`
    try:
        result = subprocess.run([sys.executable, "-m", "flows.remote", "configure"], cwd=repo, text=True,
                                env=env | {"PYTHONPATH": str(ROOT)},  # this stack's code, whatever `repo` is
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise StackError(f"`python -m flows.remote configure` did not finish in {START_TIMEOUT_S:.0f} s "
                         f"in {repo}") from None
    if result.returncode != 0:
        raise StackError(f"`python -m flows.remote configure` failed in {repo}:\n{result.stdout.strip()[-2000:]}")
    state["dvc"]["written"] = config.read_text()
    write_state(home, state)


def restore_remote(state: dict) -> str | None:
    """Put the repo's .dvc/config.local back as it was before `up` pointed it at this stack, unless
    someone changed it since; returns what was done (None: `up` never touched it)."""
    dvc = state.get("dvc") or {}
    if "before" not in dvc:
        return None
    config = local_config(Path(state["repo"]))
    current = config.read_text() if config.is_file() else None
    if dvc["written"] is not None and current != dvc["written"]:
        return f"{config} changed since `up`: left as it is"
    if current == dvc["before"]:
        return None
    if dvc["before"] is None:
        config.unlink(missing_ok=True)
    else:
        tmp = config.with_name(f".{config.name}.{os.getpid()}.tmp")
        tmp.write_text(dvc["before"])
        os.replace(tmp, config)
    return f"{config} restored: its DVC remote is as before `up`"


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


def down(home: Path) -> tuple[list[str], list[str]]:
    """Stop every service of the stack by its PID (the worker first, so no run starts on a stack
    going down), put the repo's DVC remote back as it was before `up`, and forget the stopped
    services. Always goes to the end; returns (what was done, what could not be stopped: those stay
    recorded in DIR/stack.json)."""
    state = read_state(home)
    if state is None:
        return [f"no stack in {home}"], []
    services = state["services"]
    if "worker" in services:
        stop([services["worker"]])
    stop([record for name, record in services.items() if name != "worker"])
    left = {name: record for name, record in services.items() if not foreign(record) and group_alive(record["pid"])}
    problems = [f"{name} (process group {record['pid']}: `kill -9 -{record['pid']}`)" for name, record in left.items()]
    # A port still served after its server stopped: a process that left the group holds it. Only a
    # server that was ready owned its port; another program may hold a port one never bound.
    deadline = time.monotonic() + 10
    served = {name: r["port"] for name, r in services.items() if name not in left and r.get("ready") and r.get("port")}
    while any(listening(port) for port in served.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    problems += [f"port {port} (of {name}) still listening after {name} stopped"
                 for name, port in served.items() if listening(port)]
    stopped = [name for name in reversed(SERVICES) if name in services and name not in left]
    done = [f"stopped {', '.join(stopped) or 'nothing (none was running)'} (data kept in {home})"]
    restored = restore_remote(state)
    if restored:
        done.append(restored)
    if left:
        write_state(home, state | {"services": left, "dvc": {}})
    else:
        (home / STATE).unlink(missing_ok=True)
    return done, problems


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
    dvc = state.get("dvc") or {}
    if dvc.get("left"):
        print(f"dvc      {state['repo']}/.dvc/config.local left pointing at {dvc['left']} (another stack)")
    elif dvc.get("written") is not None:
        print(f"dvc      remote `{REMOTE}` = s3://{DVC_BUCKET}/lmforge (in {state['repo']}/.dvc/config.local)")
    else:
        print("dvc      remote not configured yet (every service up first)")
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
            done, problems = down(home)
            for line in done:
                print(line)
            if problems:
                raise StackError(f"could not stop: {'; '.join(problems)}")
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
