"""The flow's side of the DVC repository, read and written through DVC itself: the stage graph,
`dvc status`, dvc.lock entries, param overrides (DVC's hydra editor, then validated), `dvc exp save`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from flows.errors import PipelineError
from lmforge.core.redact import redact


def dvc_stages(root: Path) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(stage names in topological order, name -> upstream stage names, name -> metrics files),
    from DVC's index of dvc.yaml; ties keep dvc.yaml's order."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        position = {stage: i for i, stage in enumerate(stages)}
        graph = repo.index.graph  # edges go from a stage to the stages it depends on
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: f"{position[s]:06d}")
        names = [stage.name for stage in order]
        upstream = {stage.name: sorted(s.name for s in nx.descendants(graph, stage)) for stage in stages}
        metrics = {stage.name: [str(out.def_path) for out in stage.outs if out.metric] for stage in stages}
        outs = [(stage.name, Path(str(out.def_path))) for stage in stages for out in stage.outs]
    # A metrics file inside a stage's directory output is listed in dvc.yaml's top-level `metrics:`
    # (DVC refuses it among the stage's own outs): it belongs to the stage that writes that directory.
    for path in (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("metrics", []):
        owner = next((name for name, out in outs if Path(path).is_relative_to(out)), None)
        if owner is not None:
            metrics[owner].append(str(path))
    return names, upstream, metrics


def dvc_changed(root: Path) -> set[str]:
    """Stages `dvc status` reports as changed (anything DVC would rerun)."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return {name.split(":")[-1] for name in repo.status()}
    except LockError as exc:
        raise PipelineError(
            f"{exc}\nno stage run: another DVC process (another pipeline run or `dvc repro`) holds the lock "
            f"of {root}; wait for it to finish"
        ) from None


def dvc_lock_entry(root: Path, stage: str) -> Any:
    """The stage's entry in dvc.lock (None: not recorded yet)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    return ((yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}).get(stage)


def exp_save(repo: Path, overrides: list[str], name: str, env: Mapping[str, str], logger: Any) -> str | None:
    """Record the workspace (params with the overrides, dvc.lock, outputs) as the DVC experiment
    `name` (`dvc exp save`; it then shows in `dvc exp show`); None when DVC could not."""
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "-n", name], cwd=repo,
                            env=dict(env), capture_output=True, text=True)
    if result.returncode != 0:
        logger.warning("dvc exp save failed (the run is done; params.yaml keeps the overrides): %s",
                       redact(" ".join((result.stderr or result.stdout).strip().splitlines()[-1:])))
        return None
    logger.info("overrides %s recorded as DVC experiment %s (dvc exp show)", redact(str(overrides)), name)
    return name


# ------------------------------------------------------------------------------------- overrides


def apply_param_overrides(overrides: list[str], params_path: Path) -> None:
    """Write each `key=value` into params.yaml with DVC's own hydra editor (what `dvc exp run -S`
    does, comments kept), then validate the file as written with lmforge.core.params: the stages read
    those bytes, so a value is checked as DVC wrote it (`0x200` is written as the string '0x200').
    Any failure, of any kind, puts the original bytes back."""
    from lmforge.core.errors import LmforgeError
    from lmforge.core.params import load_params

    check_params_file(params_path)
    original = params_path.read_bytes()
    try:
        for item in overrides:
            _apply_override(item, params_path)
        load_params(params_path)
    except BaseException as exc:
        if params_path.read_bytes() != original:
            _write_atomically(params_path, original)
        if isinstance(exc, LmforgeError):
            raise PipelineError(f"{exc}\n(from the overrides {overrides}; {params_path.name} left as it was)") from None
        raise


def check_params_file(params_path: Path) -> None:
    """params.yaml read as the stages read it (size and YAML aliases bounded: lmforge.core.params), before
    DVC reads it: DVC's loader and its override editor expand aliases without limit, so a "billion
    laughs" file hung `dvc status` and the editor. A file that is not YAML fails here too."""
    from lmforge.core.errors import LmforgeError
    from lmforge.core.params import read_params_yaml

    try:
        read_params_yaml(params_path)
    except LmforgeError as exc:
        raise PipelineError(str(exc)) from None


def _apply_override(item: str, params_path: Path) -> None:
    """One override through DVC's editor, as `++key=value`: hydra's "set, or add when absent", so a
    valid key that params.yaml leaves to its default can be set too (validation catches unknown
    keys). A malformed override is one line naming it."""
    from dvc.exceptions import DvcException, InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    key, sep, _ = item.partition("=")
    if not sep or not key.strip() or key.strip().startswith(("+", "~")):
        raise PipelineError(f"override {item!r} is not of the form key=value (e.g. tokenizer.vocab_size=8192)")
    try:
        apply_overrides(params_path, [f"++{item.strip()}"])
    except InvalidArgumentError as exc:  # DVC's wrapper of hydra's parse and composition errors
        why = str(exc.__cause__ or exc).splitlines()[0]
        raise PipelineError(
            f"override {item!r} is malformed ({why}): write it as `dvc exp run -S` takes it, e.g. "
            f"tokenizer.vocab_size=8192, data.files=[a.txt,b.txt], or a quoted string key='a: b'"
        ) from None
    except DvcException as exc:  # params.yaml itself: not YAML, not readable
        raise PipelineError(f"override {item!r} could not be applied: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. omegaconf on `data.files.x=1` (a key into a list)
        why = str(exc).splitlines()[0] if str(exc) else ""
        raise PipelineError(f"override {item!r} could not be applied to {params_path} ({type(exc).__name__}: "
                            f"{why}): check its key path against params.yaml") from None


def _write_atomically(path: Path, data: bytes) -> None:
    """`data` into `path` through a temporary file and a rename: an interruption leaves the old or
    the new bytes, never a half-written params.yaml."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
