"""The documentation: the docs site builds with `mkdocs build --strict` (a broken link, a
missing page, a page outside the nav or a missing included file fails), needs no network, and
the README stays short enough to read on a screen; every shell block the README and the pages
mark `<!-- runnable -->` runs as written on a copy of the tiny pipeline."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tool_env

README_MAX_BYTES = 12 * 1024


def test_readme_fits_in_12_kb() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes: move detail into docs/ (limit {README_MAX_BYTES:,})"


def test_readme_links_point_at_files_that_exist() -> None:
    """The README is outside docs/, so mkdocs does not check its links: this does."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http", "#"))]
    assert targets, "README.md links into no file"
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_docs_site_builds_strictly_and_loads_nothing_from_the_network(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    remote = set()
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        remote |= set(re.findall(r'<(?:script|link)[^>]*(?:src|href)="(https?://[^"]+)"', html))
    assert not remote, f"the site loads from the network: {sorted(remote)}"


# A fenced shell block that the docs promise runs as written: this comment line right before it.
# It renders as nothing, on GitHub and in the site. Only commands that run offline, on CPU, in
# seconds on the tiny pipeline are marked; `make run`, GPU and team-stack commands are not.
RUNNABLE = re.compile(r"^<!-- runnable -->\n```(?:bash|sh)[^\n]*\n(.*?)^```", re.M | re.S)
COMMAND_TIMEOUT_S = 180


def runnable_blocks() -> list[tuple[str, str]]:
    """(file:line, block) for every block marked runnable in the README and the docs pages."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    blocks = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for match in RUNNABLE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            blocks.append((f"{page.relative_to(REPO)}:{line}", match.group(1)))
    return blocks


def test_readme_and_guides_mark_commands_as_runnable() -> None:
    where = {name.split(":")[0] for name, _ in runnable_blocks()}
    assert "README.md" in where, "README.md marks no block `<!-- runnable -->`"
    assert any(name.startswith("docs/guides/") for name in where), "no guide marks a block `<!-- runnable -->`"


@pytest.mark.parametrize("where,block", runnable_blocks(), ids=[name for name, _ in runnable_blocks()])
def test_documented_command_runs_as_written(where: str, block: str, tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"  # a private copy: the session's tiny_repo is shared and stays as built
    shutil.copytree(tiny_repo, repo, symlinks=True)
    try:
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=repo, env=tool_env(),
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: did not finish within {COMMAND_TIMEOUT_S} s:\n{block}")
    assert result.returncode == 0, (f"{where}: exit status {result.returncode}:\n{block}\n"
                                    f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
