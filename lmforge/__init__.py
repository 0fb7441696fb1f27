"""lmforge: a reproducible data-to-model pipeline for language models."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Quiet and offline by default: no telemetry from the tools the stages start.
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def quiet_env(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Telemetry off in `env` (default: this process's environment, which children inherit); the one
    place these switches are set. setdefault, so a user who wants telemetry can still opt in."""
    env = os.environ if env is None else env
    for key, value in TELEMETRY_OFF.items():
        env.setdefault(key, value)
    return env


quiet_env()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

__version__ = "0.1.0"
