"""The model stages import the heavy libraries only on the paths that use them (each costs seconds
per stage run, and the suite runs the stages dozens of times): peft (and transformers) only for
LoRA, sklearn (and scipy, pandas) only where labels are scored, matplotlib only when plotting,
safetensors only when a model is written or read, MLflow never in the training stages, and promote, which usually decides without
loading a model, not even torch. Each check is a fresh interpreter: this one has them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# What importing the module must leave out of sys.modules.
NOT_ON_IMPORT = {
    "stages.promote": {"torch", "safetensors", "sklearn", "scipy", "pandas", "matplotlib", "peft", "transformers"},
    "stages.evaluate": {"sklearn", "scipy", "pandas", "matplotlib", "peft", "transformers"},
    # the training stages' runs are written by the tracking agent (lmforge.track.live)
    "stages.finetune": {"mlflow", "sklearn", "matplotlib", "peft", "transformers"},
    "stages.pretrain": {"mlflow", "sklearn", "matplotlib", "peft", "transformers"},
    "stages.finetune_data": {"torch", "sklearn", "matplotlib", "peft", "transformers"},
}


def imported_after(code: str) -> set[str]:
    """The top-level packages in sys.modules after a fresh interpreter runs `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", sorted(NOT_ON_IMPORT))
def test_a_stage_module_imports_no_library_only_some_paths_need(module):
    loaded = imported_after(f"import {module}") & NOT_ON_IMPORT[module]
    assert not loaded, f"importing {module} imports {sorted(loaded)}: import them in the function that needs them"


def test_full_fine_tuning_never_imports_peft():
    """recipe.export asks is_peft of every model it exports: for full and frozen the answer must not
    cost peft's import."""
    loaded = imported_after(
        "import torch\n"
        "from lmforge.finetune.methods import apply_method, is_peft, merged_model\n"
        "model = apply_method(torch.nn.Linear(2, 2), 'full', 'classify')\n"
        "assert not is_peft(model) and merged_model(model) is model\n"
    )
    assert "peft" not in loaded  # (LoRA's merge, which needs is_peft to say yes: tests/test_finetune.py)

