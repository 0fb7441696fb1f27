"""Credentials never leave the process in a message: lmforge.core.redact masks them in any text."""

import pytest

from lmforge.core.redact import redact


@pytest.mark.parametrize("text, secret, kept", [
    ("MLFLOW_TRACKING_URI=http://user:s3cret@127.0.0.1:5000", "s3cret", "http://user:***@127.0.0.1:5000"),
    ("https://ghp_TOKEN123@github.com/org/repo.git", "ghp_TOKEN123", "https://***@github.com/org/repo.git"),
    ("url https://host/api?x=1&token=abc123&y=2 done", "abc123", "https://host/api?x=1&token=***&y=2 done"),
    ("s3://b/k?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA1", "deadbeef", "s3://b/k?X-Amz-Signature=***"),
    ("postgresql://mlflow:pw%40x@db:5432/mlflow", "pw%40x", "postgresql://mlflow:***@db:5432/mlflow"),
])
def test_redact_masks_userinfo_and_token_params(text, secret, kept):
    out = redact(text)
    assert secret not in out
    assert kept in out


def test_redact_keeps_text_without_credentials():
    text = "sqlite:///tmp/mlflow.db and http://127.0.0.1:5000/#/experiments/1 user@example.com"
    assert redact(text) == text
