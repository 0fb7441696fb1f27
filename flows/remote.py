"""A checkout's exchange with the team's shared storage, through DVC and git themselves: the DVC
remote configured from the environment, `dvc pull` before a run, and `publish` after it (`dvc push`,
then dvc.lock committed and pushed to git's origin), so that another machine's clone pulls the
results and finds every stage a cache hit (but promote, which always runs: it reads the registry).

    python -m flows.remote configure     # the DVC remote in .dvc/config.local, from the environment
    python -m flows.remote checkout      # a worker's clone: publish what an earlier run did not, then update
    python -m flows.remote pull          # configure, then `dvc pull --allow-missing` (a pull step)

A worker (prefect.yaml's pull steps) keeps, under LMFORGE_WORKER_DIR: its clone `lmforge/`, the DVC
cache `dvc-cache/` and the training checkpoints `checkpoints/` (LMFORGE_CHECKPOINTS_DIR, which
lmforge.core.paths reads), the last two outside the clone. `checkout` never replaces the clone: when it
holds what a run could not publish (a failed `dvc push` or `git push`), it publishes that first, and
when that fails too it refuses, deleting nothing, and says how to recover.

The remote: LMFORGE_DVC_REMOTE (its name, default `lmforge`) at LMFORGE_DVC_REMOTE_URL (e.g.
s3://bucket/path), with AWS_ENDPOINT_URL as its endpoint when set (MinIO, any S3-compatible store).
Without LMFORGE_DVC_REMOTE_URL the repository's own default remote (.dvc/config) is used. Keys stay
in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): never written, printed or logged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from flows.errors import PipelineError
from lmforge.core.redact import redact

REMOTE_ENV = "LMFORGE_DVC_REMOTE"
REMOTE_URL_ENV = "LMFORGE_DVC_REMOTE_URL"
DEFAULT_REMOTE = "lmforge"
WORKER_DIR_ENV = "LMFORGE_WORKER_DIR"
GIT_URL_ENV = "LMFORGE_GIT_URL"
CHECKPOINTS_ENV = "LMFORGE_CHECKPOINTS_DIR"  # read by lmforge.core.paths
WORKER_CACHE = "dvc-cache"  # under LMFORGE_WORKER_DIR, beside the clone
WORKER_CHECKPOINTS = "checkpoints"
PUBLISHED = ["dvc.lock", ":(glob)**/.gitignore"]  # what a run changes in git (DVC lists its outputs in .gitignore)
SIDE_BRANCH = "lmforge-pipeline/unmerged-{}"  # a run's dvc.lock that conflicts with the branch's
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
    branch checked out, with any earlier commit a failed `git push` left (see push_commits).
    Returns the commit pushed, None when there was nothing to push."""
    configure_remote(root, env)
    _run(_dvc("push"), root, env, log)
    branch = current_branch(root, env)
    git_env = {**GIT_IDENTITY, **env}  # a worker's own git identity wins
    if _run(["git", "status", "--porcelain", "--", *PUBLISHED], root, env).strip():
        _run(["git", "add", "--", *PUBLISHED], root, git_env)
        _run(["git", "commit", "-q", "-m", f"lmforge-pipeline: dvc.lock of {note}"], root, git_env)
    elif not unpushed_commits(root, env):
        log("dvc.lock unchanged: nothing to commit")
        return None
    return push_commits(root, git_env, branch, log)


def current_branch(root: Path, env: Mapping[str, str]) -> str:
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], root, env).strip()
    if branch == "HEAD":
        raise PipelineError(f"{root} is on a detached HEAD: check out a branch to publish dvc.lock to")
    return branch


def unpushed_commits(root: Path, env: Mapping[str, str]) -> list[str]:
    """Commits of HEAD on no branch of origin (as last fetched), as `<short hash> <subject>`."""
    return _run(["git", "log", "--format=%h %s", "HEAD", "--not", "--remotes=origin"], root, env).splitlines()


def push_commits(root: Path, env: Mapping[str, str], branch: str, log: Callable[[str], None]) -> str:
    """Push HEAD to origin's `branch`. When origin moved since, the local commits go on top of it
    first (rebase); when they conflict with it (another run published its dvc.lock meanwhile), they
    are pushed as the branch SIDE_BRANCH instead, and the clone follows origin's `branch`: nothing of
    either is lost (the outputs are in the DVC remote). Returns the commit pushed."""
    _run(["git", "fetch", "-q", "origin", branch], root, env)
    upstream = f"origin/{branch}"
    if subprocess.run(["git", "merge-base", "--is-ancestor", upstream, "HEAD"], cwd=root, env=dict(env),
                      capture_output=True).returncode != 0:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], root, env).strip()
        if dirty:
            raise PipelineError(f"{root} has local changes to tracked files, so its commits cannot go on top of "
                                f"{upstream}:\n{dirty}\ncommit or discard them (`git -C {root} status`)")
        if subprocess.run(["git", "rebase", "-q", upstream], cwd=root, env=dict(env),
                          capture_output=True).returncode != 0:
            _run(["git", "rebase", "--abort"], root, env)
            head = _run(["git", "rev-parse", "HEAD"], root, env).strip()
            side = SIDE_BRANCH.format(head[:12])
            _run(["git", "push", "-q", "origin", f"HEAD:refs/heads/{side}"], root, env, log)
            _run(["git", "reset", "-q", "--keep", upstream], root, env)
            log(f"dvc.lock of this clone conflicts with {upstream}'s (another run published meanwhile): pushed as "
                f"the branch {side} instead (`git checkout {side} && dvc pull` gets its outputs); the clone now "
                f"follows {upstream}")
            return head
    _run(["git", "push", "-q", "origin", f"HEAD:refs/heads/{branch}"], root, env, log)
    commit = _run(["git", "rev-parse", "HEAD"], root, env).strip()
    log(f"dvc.lock committed as {commit[:12]} and pushed to origin/{branch}")
    return commit


# ------------------------------------------------------------------------------ a worker's clone


def worker_locations(env: Mapping[str, str]) -> dict[str, str]:
    """On a worker (LMFORGE_WORKER_DIR set), where its stages keep their checkpoints: beside the
    clone, not in it. The flow gives this to the stages it runs."""
    directory = env.get(WORKER_DIR_ENV)
    return {CHECKPOINTS_ENV: str(Path(directory).resolve() / WORKER_CHECKPOINTS)} if directory else {}


def keep_beside_clone(root: Path, env: Mapping[str, str], log: Callable[[str], None]) -> None:
    """Point the clone's DVC cache at LMFORGE_WORKER_DIR/dvc-cache (.dvc/config.local), outside the
    clone, where the checkpoints are too (worker_locations). A cache or checkpoints an earlier
    lmforge kept inside the clone move there first."""
    directory = env.get(WORKER_DIR_ENV)
    if not directory:
        raise PipelineError(f"{WORKER_DIR_ENV} is not set: set it on the worker to the directory that holds its "
                            f"clone, DVC cache and checkpoints")
    cache = Path(directory).resolve() / WORKER_CACHE
    for inside, outside in ((root / ".dvc" / "cache", cache),
                            (root / "checkpoints", Path(worker_locations(env)[CHECKPOINTS_ENV]))):
        if inside.is_dir() and not inside.is_symlink() and not outside.exists():
            shutil.move(inside, outside)
            log(f"{inside} moved out of the clone, to {outside}")
    _run(_dvc("cache", "dir", "--local", str(cache)), root, env)


def unpublished(root: Path, env: Mapping[str, str]) -> list[str]:
    """What the clone holds that origin lacks (after a fetch): dvc.lock or DVC's .gitignore files
    changed and not committed (a failed `dvc push`), commits not pushed (a failed `git push`)."""
    found = []
    changed = [line[3:] for line in _run(["git", "status", "--porcelain", "--", *PUBLISHED], root, env).splitlines()
               if line.strip()]
    if changed:
        found.append(f"uncommitted {', '.join(changed)}")
    commits = unpushed_commits(root, env)
    if commits:
        found.append(f"{len(commits)} commit(s) not on origin ({'; '.join(commits[:3])})")
    return found


def checkout(root: Path, env: Mapping[str, str], log: Callable[[str], None] = print) -> None:
    """A worker's pull step, in its clone: the DVC cache outside the clone, then what an earlier run
    could not publish published first, then the clone fast-forwarded to origin. Refuses (a
    PipelineError saying what is unpublished and how to recover) rather than lose anything: the
    clone is never replaced."""
    wanted = env.get(GIT_URL_ENV)
    origin = _run(["git", "config", "--get", "remote.origin.url"], root, env).strip()
    if wanted and wanted != origin:
        raise PipelineError(f"{root} is a clone of {origin}, not of {GIT_URL_ENV}={wanted}: move it aside (after "
                            f"publishing anything it holds) and the next run clones afresh")
    keep_beside_clone(root, env, log)
    branch = current_branch(root, env)
    _run(["git", "fetch", "-q", "origin", branch], root, env)
    pending = unpublished(root, env)
    if pending:
        log(f"{root} holds what an earlier run did not publish ({'; '.join(pending)}): publishing it first")
        try:
            publish(root, env, "an earlier run (published by the next run's pull step)", log)
        except PipelineError as exc:
            raise PipelineError(
                f"{root} not updated, and nothing deleted: it holds what an earlier run did not publish "
                f"({'; '.join(pending)}), and publishing it failed:\n{exc}\nFix the cause (the DVC remote, git "
                f"push rights): the next run publishes it first. Or by hand: `cd {root} && dvc push`, then commit "
                f"dvc.lock and `git push origin HEAD:{branch}`"
            ) from None
    _run(["git", "merge", "-q", "--ff-only", f"origin/{branch}"], root, env, log)
    log(f"{root} is at origin/{branch} ({_run(['git', 'rev-parse', '--short=12', 'HEAD'], root, env).strip()})")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from lmforge import quiet_env

    parser = argparse.ArgumentParser(prog="python -m flows.remote", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["configure", "checkout", "pull"])
    args = parser.parse_args(argv)
    env = quiet_env(dict(os.environ))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        if args.command == "configure":
            print(f"DVC remote `{configure_remote(Path.cwd(), env)}` is the default (.dvc/config.local)")
        elif args.command == "checkout":
            checkout(Path.cwd(), env)
        else:
            pull(Path.cwd(), env)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
