"""A checkout's exchange with the team's shared storage, through DVC and git themselves: the DVC
remote configured from the environment, `dvc pull` before a run, and `publish` after it (`dvc push`,
then dvc.lock committed and pushed to git's origin), so that another machine's clone pulls the
results and finds every stage a cache hit (but promote, which always runs: it reads the registry).

    python -m flows.remote configure     # the DVC remote in .dvc/config.local, from the environment
    python -m flows.remote pull          # configure, then `dvc pull --allow-missing` (a pull step)

The remote: LMFORGE_DVC_REMOTE (its name, default `lmforge`) at LMFORGE_DVC_REMOTE_URL (e.g.
s3://bucket/path), with AWS_ENDPOINT_URL as its endpoint when set (MinIO, any S3-compatible store).
Without LMFORGE_DVC_REMOTE_URL the repository's own default remote (.dvc/config) is used. Keys stay
in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): never written, printed or logged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from flows.errors import PipelineError
from lmforge.redact import redact

REMOTE_ENV = "LMFORGE_DVC_REMOTE"
REMOTE_URL_ENV = "LMFORGE_DVC_REMOTE_URL"
DEFAULT_REMOTE = "lmforge"
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "lmforge-pipeline", "GIT_AUTHOR_EMAIL": "lmforge-pipeline@localhost",
                "GIT_COMMITTER_NAME": "lmforge-pipeline", "GIT_COMMITTER_EMAIL": "lmforge-pipeline@localhost"}


def _run(cmd: list[str], root: Path, env: Mapping[str, str], log: Callable[[str], None] | None = None) -> str:
    """`cmd` in `root`; its output (redacted) to `log` line by line; a failure is a PipelineError
    with the command's last lines."""
    result = subprocess.run(cmd, cwd=root, env=dict(env), capture_output=True, text=True)
    output = redact((result.stdout + result.stderr).strip())
    if log:
        for line in output.splitlines():
            if line.strip():
                log(line)
    if result.returncode != 0:
        shown = " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd)
        raise PipelineError(f"`{shown}` failed ({result.returncode}) in {root}:\n"
                            + "\n".join(output.splitlines()[-15:]))
    return result.stdout


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def configure_remote(root: Path, env: Mapping[str, str]) -> str:
    """The default DVC remote of `root`, set in .dvc/config.local (never committed) from the
    environment; returns its name. Without LMFORGE_DVC_REMOTE_URL the repository must already have
    a default remote."""
    url = env.get(REMOTE_URL_ENV)
    if not url:
        current = subprocess.run(_dvc("remote", "default"), cwd=root, env=dict(env), capture_output=True, text=True)
        if current.returncode != 0 or not current.stdout.strip():  # "No default remote set", status 1
            raise PipelineError(f"no DVC remote: set {REMOTE_URL_ENV} (e.g. s3://bucket/lmforge; `deploy/local-stack "
                                f"env` prints the local stack's) or add a default remote to .dvc/config")
        return current.stdout.strip()
    name = env.get(REMOTE_ENV) or DEFAULT_REMOTE
    _run(_dvc("remote", "add", "--local", "--default", "--force", name, url), root, env)
    endpoint = env.get("AWS_ENDPOINT_URL")
    if endpoint:
        _run(_dvc("remote", "modify", "--local", name, "endpointurl", endpoint), root, env)
    return name


def pull(root: Path, env: Mapping[str, str], log: Callable[[str], None] | None = print) -> None:
    """Configure the remote, then fetch what it has of dvc.lock's outputs (what it lacks, a stage
    reruns)."""
    configure_remote(root, env)
    _run(_dvc("pull", "--allow-missing"), root, env, log)


def publish(root: Path, env: Mapping[str, str], note: str, log: Callable[[str], None]) -> str | None:
    """Send what a run produced to the team: `dvc push` to the default remote, then dvc.lock (and
    the .gitignore files DVC keeps for its outputs) committed and pushed to git's `origin` on the
    branch checked out. Returns the new commit, None when dvc.lock did not change."""
    configure_remote(root, env)
    _run(_dvc("push"), root, env, log)
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], root, env).strip()
    if branch == "HEAD":
        raise PipelineError(f"{root} is on a detached HEAD: check out a branch to publish dvc.lock to")
    changed = _run(["git", "status", "--porcelain", "--", "dvc.lock", ":(glob)**/.gitignore"], root, env)
    if not changed.strip():
        log("dvc.lock unchanged: nothing to commit")
        return None
    git_env = {**GIT_IDENTITY, **env}  # a worker's own git identity wins
    _run(["git", "add", "--", "dvc.lock", ":(glob)**/.gitignore"], root, git_env)
    _run(["git", "commit", "-q", "-m", f"lmforge-pipeline: dvc.lock of {note}"], root, git_env)
    _run(["git", "push", "-q", "origin", f"HEAD:refs/heads/{branch}"], root, git_env, log)
    commit = _run(["git", "rev-parse", "HEAD"], root, env).strip()
    log(f"dvc.lock committed as {commit[:12]} and pushed to origin/{branch}")
    return commit


def main(argv: list[str] | None = None) -> int:
    import argparse

    from lmforge import quiet_env

    parser = argparse.ArgumentParser(prog="python -m flows.remote", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["configure", "pull"])
    args = parser.parse_args(argv)
    env = quiet_env(dict(os.environ))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        if args.command == "configure":
            print(f"DVC remote `{configure_remote(Path.cwd(), env)}` is the default (.dvc/config.local)")
        else:
            pull(Path.cwd(), env)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
