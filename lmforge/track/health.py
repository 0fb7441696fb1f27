"""The one `/health` check for the servers the project talks to (the MLflow tracking server, the
Prefect API): None when the server answers 200, else one line naming it, its variable and its URL
with any credential masked."""

from __future__ import annotations

from lmforge.core.redact import redact


def check_health(url: str, what: str, env_var: str, timeout: float) -> str | None:
    """None when `url`/health answers HTTP 200 within `timeout` seconds; else why not, as
    "<what> at <env_var>=<url, redacted> does not answer (<error>)" or "... answered HTTP <code>"."""
    import requests

    try:
        response = requests.get(url.rstrip("/") + "/health", timeout=timeout)
    except requests.exceptions.RequestException as exc:
        return f"{what} at {env_var}={redact(url)} does not answer ({type(exc).__name__})"
    if response.status_code != 200:
        return f"{what} at {env_var}={redact(url)} answered HTTP {response.status_code} on /health"
    return None
