import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.core.errors import LmforgeError
from lmforge.core.params import Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_yaml_is_valid_and_sets_every_documented_key():
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # Every section in the file is typed, and the file spells out every knob of each section.
    for section, values in raw.items():
        assert set(values) == set(type(getattr(params, section)).model_fields), section


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(LmforgeError) as error:
        parse_params({"tokenizer": {"vocab_sise": 4096}})
    message = str(error.value)
    assert "tokenizer.vocab_sise" in message and "vocab_size" in message


def test_unknown_section_is_an_error():
    with pytest.raises(LmforgeError, match="unknown key 'tokeniser'"):
        parse_params({"tokeniser": {}})


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(LmforgeError) as error:
        parse_params({"data": {"source": "web"}})
    message = str(error.value)
    assert "data.source" in message and "'builtin'" in message and "'files'" in message and "'web'" in message


def test_out_of_range_value_names_the_key():
    with pytest.raises(LmforgeError, match="data.val_fraction"):
        parse_params({"data": {"val_fraction": 1.5}})


def test_files_source_needs_globs():
    with pytest.raises(LmforgeError, match="data.files is empty"):
        parse_params({"data": {"source": "files", "files": []}})


def test_eos_token_must_be_a_special_token():
    with pytest.raises(LmforgeError, match="eos_token"):
        parse_params({"tokenizer": {"special_tokens": ["<pad>"]}})


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(LmforgeError, match="repository root"):
        load_params(tmp_path / "params.yaml")


def test_empty_params_file_gives_defaults(tmp_path):
    (tmp_path / "params.yaml").write_text("")
    assert load_params(tmp_path / "params.yaml") == Params()


# ------------------------------------------------------------------ what loading accepts, bounded

# Nine aliases of nine aliases of ... nine strings: 30 lines that expand to 9**9 values.
BILLION_LAUGHS = "lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{level}: &lol{level} [{', '.join([f'*lol{level - 1}'] * 9)}]\n" for level in range(1, 9)
) + "data:\n  files: *lol8\n"

# Loads params in a child process, so a load that hangs cannot hang the test.
LOAD = """
import sys
from lmforge.core.errors import LmforgeError
from lmforge.core.params import load_params
try:
    load_params(sys.argv[1])
    print("loaded")
except LmforgeError as error:
    print(error)
"""


def _load_in_child(path: Path) -> str:
    result = subprocess.run([sys.executable, "-c", LOAD, str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stdout.strip()


def test_yaml_aliases_that_expand_without_bound_are_refused_naming_the_file(tmp_path):
    # The document is 30 lines; validating (and quoting) its expansion hung every stage.
    path = tmp_path / "params.yaml"
    path.write_text(BILLION_LAUGHS)
    message = _load_in_child(path)
    assert message.startswith(f"{path} ") and "aliases" in message and len(message) < 500, message


def test_an_alias_inside_itself_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  files: &loop [a, *loop]\n")
    message = _load_in_child(path)
    assert message.startswith(f"{path} ") and "aliases" in message, message


def test_an_oversized_params_file_is_refused_naming_its_size(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(f"# {'x' * 5_000_000}\ndata:\n  source: builtin\n")  # valid YAML, 5 MB of it
    with pytest.raises(LmforgeError, match=rf"{path} is larger than .* bytes"):
        load_params(path)


def test_params_nested_too_deeply_are_one_clear_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  files: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(LmforgeError, match=rf"{path} nests"):
        load_params(path)


@pytest.mark.parametrize("section, key", [("data", "source"),  # pydantic's message, then the value
                                          ("model", "preset")])  # a validator's message that quotes it
def test_a_huge_invalid_value_is_quoted_short(section, key):
    with pytest.raises(LmforgeError) as error:
        parse_params({section: {key: "x" * 1_000_000}})
    assert f"{section}.{key}" in str(error.value) and len(str(error.value)) < 500, str(error.value)[:1000]


def test_many_errors_are_listed_up_to_a_few_then_counted():
    with pytest.raises(LmforgeError) as error:
        parse_params({"data": {"files": list(range(50_000))}})
    lines = str(error.value).splitlines()
    assert "data.files.0" in lines[1] and "49,990 more" in lines[-1] and len(lines) < 15, lines[:20]


# Applies a flow override in a child process, so an editor that hangs cannot hang the test.
OVERRIDE = """
import sys
from pathlib import Path
from flows.errors import PipelineError
from flows.dvc_repo import apply_param_overrides
try:
    apply_param_overrides(["data.val_fraction=0.1"], Path(sys.argv[1]))
    print("applied")
except PipelineError as error:
    print(error)
"""


def test_a_flow_checks_params_yaml_before_dvc_reads_it(tmp_path):
    # DVC's override editor (and `dvc status`) expand YAML aliases without limit.
    path = tmp_path / "params.yaml"
    path.write_text(BILLION_LAUGHS)
    result = subprocess.run([sys.executable, "-c", OVERRIDE, str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.startswith(f"{path} ") and "aliases" in result.stdout, result.stdout + result.stderr
    assert path.read_text() == BILLION_LAUGHS


@pytest.mark.parametrize("raw, named", [
    ({"pretrain": {"tensor_parallel": 2}}, "runtime.pretrain.nproc 1"),
    ({"pretrain": {"tensor_parallel": 3}, "runtime": {"pretrain": {"nproc": 3}}}, "n_heads 4"),
    ({"pretrain": {"tensor_parallel": 4}, "runtime": {"pretrain": {"nproc": 4}},
      "model": {"preset": "1b", "n_kv_heads": 2}}, "n_kv_heads 2"),
])
def test_tensor_parallel_must_divide_the_processes_and_the_heads(raw, named):
    with pytest.raises(LmforgeError, match=f"tensor_parallel .* does not divide {named}"):
        parse_params(raw)
    assert parse_params({"pretrain": {"tensor_parallel": 2}, "runtime": {"pretrain": {"nproc": 4}}})


@pytest.mark.parametrize("value, mode", [(True, "full"), (False, "none"), ("selective", "selective")])
def test_activation_checkpointing_reads_its_modes_and_the_old_booleans(value, mode):
    params = parse_params({"runtime": {"pretrain": {"activation_checkpointing": value}}})
    assert params.runtime.pretrain.activation_checkpointing == mode
