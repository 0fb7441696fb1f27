"""EleutherAI's lm-evaluation-harness (lm-eval, the optional extra `lmforge[eval]`) on the exported
Hugging Face models: lmforge's shipped offline tasks or any installed one -> reports/harness.json.

Without lm-eval the evaluate stage says how to install it and finishes. What the harness and
transformers print while they run (progress bars, warnings, notes) is kept off the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.core import paths
from lmforge.core.errors import LmforgeError
from lmforge.core.io import write_json
from lmforge.core.model_params import HarnessParams
from lmforge.core.numbers import human
from lmforge.core.params import Params
from lmforge.evaluate.shipped_tasks import TASK_FILES, held_out_documents, write_task_data

log = logging.getLogger("lmforge.evaluate")

INSTALL = "pip install --upgrade pip && pip install 'lmforge[eval]'"
# The shipped tasks' YAMLs beside this code (paths.HARNESS_TASKS from the repository root, for dvc.yaml).
TASKS_DIR = Path(__file__).with_name("tasks")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SHOWN_ON_FAILURE = 40  # lines of the harness's captured output printed when it fails


def lm_eval_missing() -> str | None:
    """Why the harness cannot run here (with the fix), or None when lm-eval imports."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return f"lm-eval is not installed, so no harness scores: install it with `{INSTALL}`"
    return None


def run(params: Params, finetuned: Any) -> dict[str, Any]:
    """{model: {task: {metric: value, "samples": n}}} for the pretrained model and an SFT model (a
    classifier is no causal LM), written to reports/harness.json; or {"skipped": why} (the file: {}).
    The shipped tasks' data is written to reports/harness/ first, always: the stage's outputs do
    not depend on lm-eval."""
    harness = params.evaluate.harness
    built = write_task_data(held_out_documents(paths.CLEAN, params.data.val_fraction), paths.HARNESS_DATA)
    # A corpus of short documents can give a shipped task no question: it is left out, the rest scored.
    empty = [task for task in harness.tasks if built.get(task) == 0]
    tasks = [task for task in harness.tasks if task not in empty]
    if empty:
        log.info("harness: %s left out: %s has too few long held-out documents", ", ".join(empty), paths.CLEAN)
    why = lm_eval_missing() if tasks else "evaluate.harness.tasks is empty" if not harness.tasks else \
        f"{paths.CLEAN} has too few long held-out documents for {', '.join(empty)}"
    if why:
        if harness.tasks:
            log.warning("%s", why)
        results: dict[str, Any] = {"skipped": why}
    else:
        results = {}
        with _models(params, finetuned) as models:
            for name, (model_dir, eos_token) in models.items():
                started = time.perf_counter()
                results[name] = score(model_dir, eos_token, tasks, harness)
                log.info("harness, %s model: %s (%.1f s)", name, summary(results[name]), time.perf_counter() - started)
    write_json(paths.HARNESS, {} if why else results)  # a DVC metric: numbers only (why: in the log and report)
    return results


@contextlib.contextmanager
def _models(params: Params, finetuned: Any) -> Iterator[dict[str, tuple[Path, str]]]:
    """name -> (Hugging Face model directory, its EOS token): the pretrained export, and the SFT model
    exported to a temporary directory (the finetune stage writes lmforge's format only)."""
    models = {"pretrained": (paths.PRETRAINED_HF, params.tokenizer.eos_token)}
    if finetuned is None or finetuned.task != "sft":
        yield models
        return
    from lmforge.model.export import write_hf_llama

    with tempfile.TemporaryDirectory(prefix="lmforge-harness-") as tmp:
        write_hf_llama(finetuned.model.state_dict(), finetuned.config, Path(tmp) / "sft",
                       tokenizer_path=paths.FINETUNED / "tokenizer.json", eos_id=finetuned.eos_id)
        yield models | {"sft": (Path(tmp) / "sft", finetuned.tokenizer.id_to_token(finetuned.eos_id))}


def score(model_dir: Path, eos_token: str, tasks: list[str], harness: HarnessParams) -> dict[str, dict[str, float]]:
    """The harness's scores of one Hugging Face model directory (CPU, float32: the figures evaluate's
    other numbers are measured beside), {task: {metric: value, "samples": n}}."""
    shipped_only = set(tasks) <= set(TASK_FILES)
    with _quiet_output(), _environment(OFFLINE if shipped_only else {}):
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from transformers import PreTrainedTokenizerFast

        # The export's tokenizer.json names no special tokens: EOS separates documents in pretraining,
        # so it starts a context and pads a batch (the harness would otherwise add a token the model lacks).
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                            eos_token=eos_token, pad_token=eos_token)
        model = HFLM(pretrained=str(model_dir), tokenizer=tokenizer, device="cpu", dtype="float32",
                     batch_size=harness.batch_size)
        # Indexing the harness's own hundreds of tasks takes seconds: only when one of them is asked.
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not shipped_only)
        unknown = [task for task in tasks if task not in manager.all_tasks]
        if unknown:
            raise LmforgeError(f"evaluate.harness.tasks: unknown harness task(s) {unknown}: name lmforge's "
                               f"{sorted(TASK_FILES)} or a task `lm_eval ls tasks` lists")
        try:
            out = lm_eval.simple_evaluate(model=model, tasks=list(tasks), num_fewshot=harness.num_fewshot,
                                          limit=harness.limit, task_manager=manager, log_samples=False,
                                          bootstrap_iters=0)  # no resampling: seconds, and processes, saved
        except OSError as exc:  # datasets' ConnectionError: a standard task's data not reachable, nor cached
            raise LmforgeError(f"evaluate.harness.tasks: a task's data could not be loaded ({exc}): let this "
                               "machine reach the Hugging Face Hub once (the data is cached after), or leave "
                               "the task out") from None
    return task_scores(out)


def task_scores(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value, "samples": n}} from simple_evaluate's output: `acc,none` -> `acc`, a
    filtered metric `exact_match,strict-match` -> `exact_match_strict-match`; no stderr (not
    computed), nothing non-finite (JSON and MLflow refuse it)."""
    scores: dict[str, dict[str, float]] = {}
    for task, row in out["results"].items():
        task_figures: dict[str, float] = {}
        for key, value in row.items():
            metric, _, where = key.partition(",")
            if not where or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                task_figures[metric if where == "none" else f"{metric}_{where}"] = float(value)
        samples = out.get("n-samples", {}).get(task, {}).get("effective")
        if samples is not None:
            task_figures["samples"] = samples
        scores[task] = task_figures
    return scores


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """MLflow's names: `harness/<task>/<metric>` for the pretrained model, `harness_sft/...` for the
    SFT model (the evaluate run adds its `evaluate/` prefix)."""
    flat = {}
    for model, prefix in (("pretrained", "harness"), ("sft", "harness_sft")):
        for task, figures in results.get(model, {}).items():
            for metric, value in figures.items():
                flat[re.sub(r"[^\w\-. /]", "_", f"{prefix}/{task}/{metric}")] = value
    return flat


def summary(scores: dict[str, dict[str, float]]) -> str:
    """`task metric 0.123, ...` for a log line (numbers as lmforge.core.numbers.human writes them: 13,674)."""
    return "; ".join(f"{task} " + ", ".join(f"{m} {human(v)}" for m, v in figures.items() if m != "samples")
                     for task, figures in scores.items())


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in this process's environment (where not set already) inside, restored after."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """Everything written to this process's stderr inside (the harness's and transformers' logging,
    progress bars, warnings, a `git` child's complaint) captured at the file descriptor, shown only
    (its last lines) when the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        failed = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except LmforgeError:
            raise  # its message says it all
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                captured.seek(0)
                lines = captured.read().decode("utf-8", "replace").splitlines()[-SHOWN_ON_FAILURE:]
                print("\n".join(["lm-evaluation-harness output:", *lines]), file=sys.stderr)
