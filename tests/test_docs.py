"""The documentation: the docs site builds with `mkdocs build --strict` (a broken link, a
missing page, a page outside the nav or a missing included file fails), needs no network, and
the README stays short enough to read on a screen."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

README_MAX_BYTES = 12 * 1024


def test_readme_fits_in_12_kb() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes: move detail into docs/ (limit {README_MAX_BYTES:,})"


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
