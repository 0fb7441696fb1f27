import os

import pytest

from lmforge.data.tokens.tokenizer import encode_plain, load_tokenizer, save_tokenizer, tokenizer_threads, train_tokenizer
from lmforge.core.errors import LmforgeError
from lmforge.core.params import TokenizerParams

from conftest import make_texts

PARAMS = TokenizerParams(vocab_size=400)


def test_training_is_deterministic(tmp_path):
    texts = make_texts(300)
    save_tokenizer(train_tokenizer(texts, PARAMS), tmp_path / "a.json")
    save_tokenizer(train_tokenizer(texts, PARAMS), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_special_tokens_and_vocab_size():
    tokenizer = train_tokenizer(make_texts(300), PARAMS)
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.token_to_id("<|pad|>") == 1
    assert tokenizer.get_vocab_size() <= PARAMS.vocab_size


def test_byte_level_round_trips_any_text():
    tokenizer = train_tokenizer(make_texts(300), PARAMS)
    text = "Ünïcode — never seen: 日本語 ✓ \t tabs"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_loads_as_pretrained_tokenizer_fast(tmp_path):
    from transformers import PreTrainedTokenizerFast  # here: collection imports every test module in every xdist worker

    tokenizer = train_tokenizer(make_texts(300), PARAMS)
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>")
    text = "The quick brown fox returns a value."
    assert fast.encode(text) == tokenizer.encode(text).ids
    assert fast.eos_token_id == 0


def test_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="tokenizer.json is not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("before", [None, "true"])
def test_tokenizer_threads_switch_per_block_and_restore_the_environment(monkeypatch, before):
    # A worker's encode task keeps to its core when every worker has a partition (no oversubscription).
    if before is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
    tokenizer = train_tokenizer(make_texts(300), PARAMS)
    texts = make_texts(200)
    with tokenizer_threads(spread=False):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        serial = encode_plain(tokenizer, texts)
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before
    with tokenizer_threads(spread=True):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
        assert encode_plain(tokenizer, texts) == serial  # the tokens never depend on the threads
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before
