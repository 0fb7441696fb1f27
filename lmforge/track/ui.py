"""How lmforge's runs read in MLflow's UI: the one builder of every link into it (always the runs
view, never the GenAI one; `run_link`: the line a stage prints), the URL of a run's artifact that a rendered markdown page can show, run
names that tell runs apart, and the params that define the model a scoring run scores.

MLflow 3's UI opens an experiment in its GenAI view (traces, judges, playground) unless the URL says
otherwise: the WorkflowTypeProvider around every page (runs table and run page alike) reads the
`workflowType` query parameter before the choice stored in the browser. So every link carries
RUNS_VIEW, and every link is built by `ui_page`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import yaml

from lmforge.core.params import flatten
from lmforge.core.redact import redact

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` (`make ui`) serves a local store by default
RUNS_VIEW = "workflowType=machine_learning"

# The params that define a model: every scoring stage (evaluate, promote) logs them beside its own,
# so MLflow's comparison of runs (parallel coordinates, the table's columns) lines them up with the
# training runs' own, and the flow's parent run carries them too.
KEY_PARAMS = ("data.source", "tokenizer.vocab_size", "tokenizer.seq_len", "model.preset", "pretrain.max_steps",
              "pretrain.lr", "pretrain.precision", "runtime.pretrain.nproc", "finetune.task", "finetune.method",
              "finetune.max_steps", "finetune.lr")
# The param a stage's run name shows whatever changed (`finetune · method=frozen`): what its model is.
NAMED_BY = {"pretrain": "model.preset", "finetune": "finetune.method", "evaluate": "finetune.method",
            "promote": "finetune.method"}
DVC_EXP_NAME, DVC_EXP_BASELINE_REV = "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"  # set by `dvc exp run` (dvc.env)
MAX_CHANGES_NAMED = 3  # a run name stays readable in the table; the run's params hold the rest


def ui_base(uri: str) -> str:
    """The UI that shows tracking URI `uri`: the server itself, or LOCAL_UI for a local store."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def ui_page(experiment_id: str, run_id: str | None = None) -> str:
    """The UI-relative page of a run (or, without one, of the experiment's runs table), runs view."""
    run = f"/{run_id}" if run_id else ""
    return f"#/experiments/{experiment_id}/runs{run}?{RUNS_VIEW}"


def ui_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The full link to `ui_page` on the UI of tracking URI `uri`, credentials masked."""
    return redact(f"{ui_base(uri)}/{ui_page(experiment_id, run_id)}")


def artifact_url(uri: str, run_id: str, path: str) -> str:
    """An absolute URL of a run's artifact, served by the UI's own `get-artifact` endpoint.
    MLflow's markdown viewer shows an image only from an absolute http(s) URL (a relative one is
    printed as its link text); no credentials in it: the browser sends its own to the same host."""
    scheme, netloc, base_path, _, _ = urlsplit(ui_base(uri))
    base = urlunsplit((scheme, netloc.rpartition("@")[2], base_path.rstrip("/"), "", ""))
    return f"{base}/get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"


_MD_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")


def with_artifact_images(markdown: str, uri: str, run_id: str, artifact_dir: str) -> str:
    """`markdown` whose relative image paths (relative to `artifact_dir` in the run's artifacts)
    are artifact_url's, for MLflow's viewer; absolute ones are kept."""
    def absolute(match: re.Match[str]) -> str:
        src = match.group("src")
        if re.match(r"^[a-z][a-z0-9+.-]*:", src, re.IGNORECASE):
            return match.group(0)
        return f"![{match.group('alt')}]({artifact_url(uri, run_id, f'{artifact_dir}/{src}')})"

    return _MD_IMAGE.sub(absolute, markdown)


# ------------------------------------------------------------------------------------ run names


def _flat_strings(params: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in flatten(dict(params)).items()}


def changed_params(root: Path) -> dict[str, str]:
    """key -> value of the params in root's params.yaml that differ from the baseline's: the commit
    a `dvc exp run` started from (DVC_EXP_BASELINE_REV), else HEAD. {} without git or a baseline."""
    rev = os.environ.get(DVC_EXP_BASELINE_REV) or "HEAD"
    try:
        base = subprocess.run(["git", "show", f"{rev}:params.yaml"], cwd=root, capture_output=True, text=True,
                              timeout=30)
        if base.returncode != 0:
            return {}
        before = _flat_strings(yaml.safe_load(base.stdout) or {})
        now = _flat_strings(yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {})
    except (OSError, subprocess.SubprocessError, yaml.YAMLError, AttributeError, TypeError):
        return {}
    return {key: value for key, value in now.items() if before.get(key) != value}


def run_name(stage: str, params: Mapping[str, str], changed: Mapping[str, str]) -> str:
    """`<stage> · <what its model is> · <what changed> · exp <DVC experiment>`, e.g.
    `finetune · method=frozen · exp gusty-tuba`: runs of one stage told apart in the table and charts."""
    labels = []
    named = NAMED_BY.get(stage)
    if named and named in params:
        labels.append(f"{named.rpartition('.')[2]}={params[named]}")
    others = [f"{key}={value}" for key, value in changed.items() if key != named and not key.startswith("runtime.")]
    labels += others[:MAX_CHANGES_NAMED] + ([f"+{len(others) - MAX_CHANGES_NAMED} more"]
                                           if len(others) > MAX_CHANGES_NAMED else [])
    if os.environ.get(DVC_EXP_NAME):
        labels.append(f"exp {os.environ[DVC_EXP_NAME]}")
    return " · ".join([stage, *labels])[:250]


def model_params(all_params: Mapping[str, Any], changed: Mapping[str, str]) -> dict[str, str]:
    """KEY_PARAMS and the changed keys of the whole params (flattened): what a scoring run logs
    about the model it scores."""
    flat = flatten(dict(all_params))
    keys = [key for key in (*KEY_PARAMS, *changed) if key in flat and not key.startswith("runtime.")]
    return {key: json.dumps(flat[key]) if isinstance(flat[key], (list, dict)) else str(flat[key])
            for key in dict.fromkeys(keys)}


def run_link(experiment_id: str, run_id: str) -> str:
    """Where to see a stage's run: its page on the server, or on the local store once served."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    link = ui_link(uri, experiment_id, run_id)
    if uri.startswith(("http://", "https://")):
        return link
    # `make ui` serves MLFLOW_TRACKING_URI too: name the store it will open, not always the default
    return f"{link} (`make ui` first: mlflow ui --backend-store-uri {redact(uri or 'sqlite:///mlflow.db')})"
