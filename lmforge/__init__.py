"""lmforge: a reproducible data-to-model pipeline for language models."""

import os

# Quiet and offline by default: no telemetry from the tools the stages start.
# setdefault so a user who wants telemetry can still opt in from the environment.
for _key, _value in {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "true",
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
