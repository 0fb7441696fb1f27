"""The suite passes in the shell a team works in: after `eval "$(deploy/local-stack env)"` (README)
the team stack's variables are exported, and no test may inherit them by accident; a test that
starts a process gives it the environment it means to test (conftest: SHELL_TEAM_STACK, tool_env)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, tool_env

# What `deploy/local-stack env` exports, every address a dead port (nothing listens on port 9).
DEAD_STACK = {
    "PREFECT_API_URL": "http://127.0.0.1:9/api", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "team", "AWS_SECRET_ACCESS_KEY": "team-secret",
    "AWS_DEFAULT_REGION": "us-east-1", "LMFORGE_DVC_REMOTE": "team", "LMFORGE_DVC_REMOTE_URL": "s3://lmforge-dvc/lmforge",
    "LMFORGE_CHECKPOINTS_DIR": "/nonexistent/checkpoints",
}
# Tests that read those variables, in a subprocess (the remote) or in-process (paths, at import).
AFFECTED = ["tests/test_deploy.py::test_a_checkout_without_a_remote_is_told_what_to_set", "tests/test_paths.py"]


def test_tests_run_from_a_team_stack_shell_see_none_of_its_variables(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--basetemp",
         str(tmp_path / "t"), *AFFECTED],
        cwd=REPO, env=tool_env(PYTHONPATH=str(REPO), **DEAD_STACK), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
