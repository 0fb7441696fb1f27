"""dvc.yaml's plots as image files, drawn offline: DVC's own Vega-Lite specs (`dvc plots show
--json`, data inlined) rendered by vl-convert, so a picture needs neither a browser nor a CDN.

`python -m lmforge.evaluate.plots` (`make plots`) writes reports/plots/<plot>.svg.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge import quiet_env

from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.core.errors import LmforgeError

log = logging.getLogger("lmforge.evaluate.plots")

FORMATS = ("svg", "png")


def vegalite_version(spec: dict[str, Any]) -> str | None:
    """The newest Vega-Lite vl-convert bundles of the major version the spec's `$schema` names
    (DVC writes v5 specs; its HTML loads Vega-Lite 5), else None: vl-convert's default."""
    import vl_convert

    major = re.search(r"/vega-lite/v(\d+)[\d.]*\.json$", str(spec.get("$schema", "")))
    versions = [v for v in vl_convert.get_vegalite_versions() if major and v.split(".")[0] == major.group(1)]
    return max(versions, key=lambda v: tuple(int(part) for part in v.split("."))) if versions else None


def render(spec: dict[str, Any], path: str | Path, scale: float = 2.0) -> Path:
    """Draw one Vega-Lite spec into `path`, an .svg or .png file. No network: the renderer may not
    fetch any URL (`allowed_base_urls=[]`), so the spec's data must be inline, as DVC's is."""
    import vl_convert

    from lmforge.core.io import atomic_path

    path = Path(path)
    options = {"vl_version": vegalite_version(spec), "allowed_base_urls": []}
    if path.suffix == ".svg":
        image = vl_convert.vegalite_to_svg(spec, **options).encode("utf-8")
    elif path.suffix == ".png":
        image = vl_convert.vegalite_to_png(spec, scale=scale, **options)
    else:
        raise ValueError(f"{path}: the image format is chosen by the suffix, one of {', '.join(FORMATS)}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(image)
    return path


def dvc_plot_specs(root: str | Path = ".") -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(plot name -> Vega-Lite spec, plot name -> error) as `dvc plots show --json` renders
    dvc.yaml's plots in `root`'s workspace; a plot whose data file is missing has an error."""
    result = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=root,
                            env=quiet_env(dict(os.environ)), capture_output=True, text=True)
    try:
        shown = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise LmforgeError(f"`dvc plots show --json` in {root} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}") from None
    specs = {name: renderer["content"] for name, renderers in (shown.get("data") or {}).items()
             for renderer in renderers if renderer.get("type") == "vega" and renderer.get("content")}
    errors = {e.get("name") or e.get("rev", ""): e.get("msg") or e.get("type", "") for e in shown.get("errors") or []}
    return specs, errors


def file_name(plot: str) -> str:
    """A file name for a plot: its dvc.yaml name (`pretrain_loss`), or a data path made flat."""
    return re.sub(r"[^\w.-]+", "_", plot).strip("_")


def render_dvc_plots(root: str | Path = ".", out: str | Path | None = None, fmt: str = "svg") -> list[Path]:
    """Render every plot of dvc.yaml that has data into `out` (default reports/plots under root)."""
    specs, errors = dvc_plot_specs(root)
    if not specs:
        found = "; ".join(f"{name}: {msg}" for name, msg in errors.items())
        raise LmforgeError("no plot of dvc.yaml could be drawn (has the pipeline run? `make run`): "
                           + (found or f"`dvc plots show` found none in {Path(root).resolve()}"))
    out = Path(root) / paths.PLOTS if out is None else Path(out)
    for name, msg in errors.items():  # e.g. the classification figures after an SFT run
        log.warning("not drawn: %s: %s", name, msg)
        (out / f"{file_name(name)}.{fmt}").unlink(missing_ok=True)  # no stale image of an older run
    written = [render(spec, out / f"{file_name(name)}.{fmt}") for name, spec in specs.items()]
    for path in written:
        log.info("wrote %s", path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmforge.evaluate.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=paths.PLOTS, help="folder for the images (default %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="svg", help="image format (default %(default)s)")
    args = parser.parse_args(argv)
    render_dvc_plots(".", args.out, args.format)


if __name__ == "__main__":
    run_stage("plots", main)
