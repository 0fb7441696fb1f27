"""The flow's errors: PipelineError (a failure with its message first, redacted once when made) and
StageInputError (a stage that failed in a way a retry cannot fix, so never retried)."""

from __future__ import annotations

from lmforge.core.redact import redact


class PipelineError(RuntimeError):
    """A failure of the pipeline with its message first: the stage's own error line, or the setup
    problem (unknown override key or stage, tracking server not answering, DVC's lock). The message
    is redacted here, once for all: Prefect logs and stores it, the CLI prints it."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class StageInputError(PipelineError):
    """A stage rejected its params or input (its `[stage] error:` line, exit status 2), or failed on a
    wrong path or a bug (flows.failures.SAME_EVERY_TIME): it fails the same way every time, so the
    flow never retries it."""
