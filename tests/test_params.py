from pathlib import Path

import pytest
import yaml

from lmforge.errors import LmforgeError
from lmforge.params import Params, load_params, parse_params

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
