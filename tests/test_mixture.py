"""Named sources mixed by weight (lmforge.data.tokens.mixture): each source gets its weight's share
of training tokens, by whole epochs and a partial one chosen by document hash, the same bytes every
time; the mixing functions are checked here on their own, the stages in tests/test_mixture_stages.py."""

from __future__ import annotations

import pytest

from lmforge.core.errors import LmforgeError
from lmforge.data.documents import document_id
from lmforge.data.tokens.mixture import copies, mixture_csv, normalised, realised, source_factors

IDS = [document_id(f"document {i}") for i in range(20_000)]


def test_weights_are_shares_whatever_their_scale():
    assert normalised({"docs": 7, "code": 3}) == pytest.approx({"docs": 0.7, "code": 0.3})
    assert normalised({"docs": 0.7, "code": 0.3}) == pytest.approx(normalised({"docs": 70, "code": 30}))


def test_factors_give_each_source_its_share_of_the_corpus_size():
    tokens = {"docs": 9_000, "code": 1_000}
    factors = source_factors(tokens, {"docs": 0.5, "code": 0.5})
    assert factors == pytest.approx({"docs": 5_000 / 9_000, "code": 5.0})
    assert sum(tokens[name] * f for name, f in factors.items()) == pytest.approx(sum(tokens.values()))


def test_one_source_of_weight_one_is_packed_once():
    assert source_factors({"all": 1234}, {"all": 1.0}) == {"all": 1.0}
    assert {copies(doc_id, 1.0) for doc_id in IDS} == {1}


def test_a_repeated_source_packs_whole_epochs_then_a_partial_one_by_hash():
    counts = [copies(doc_id, 2.25) for doc_id in IDS]
    assert set(counts) == {2, 3}
    assert sum(counts) / len(IDS) == pytest.approx(2.25, abs=0.01)  # 20,000 draws: the sd is 0.003


def test_a_subsampled_source_keeps_its_share_of_documents():
    kept = [copies(doc_id, 0.4) for doc_id in IDS]
    assert set(kept) == {0, 1}
    assert sum(kept) / len(IDS) == pytest.approx(0.4, abs=0.01)


def test_copies_are_a_function_of_the_id_alone():
    first = [copies(doc_id, 1.7) for doc_id in IDS]
    assert [copies(doc_id, 1.7) for doc_id in IDS] == first
    # the partial epoch at a larger factor keeps every document the smaller one kept (a nested sample)
    assert all(copies(doc_id, 1.9) >= n for doc_id, n in zip(IDS, first))


def test_the_partial_epoch_is_independent_of_the_val_split():
    # split_of reads hex digits 0-8 of the id; the partial epoch 16-24: val-looking ids are kept at the same rate
    val_like = [doc_id for doc_id in IDS if int(doc_id[:8], 16) / 0x1_0000_0000 < 0.1]
    assert sum(copies(doc_id, 0.5) for doc_id in val_like) / len(val_like) == pytest.approx(0.5, abs=0.05)


def test_a_weighted_source_without_train_tokens_is_an_error_naming_it():
    with pytest.raises(LmforgeError, match=r"\['code'\].*mix.weights"):
        source_factors({"docs": 100, "code": 0}, {"docs": 1, "code": 1})


def test_the_realised_mixture_states_weight_share_and_epochs():
    train = {"docs": {"tokens": 600, "documents": 6, "unique_tokens": 1200, "unique_documents": 12},
             "code": {"tokens": 400, "documents": 8, "unique_tokens": 200, "unique_documents": 4}}
    mixture = realised({"docs": 3, "code": 2}, train)
    assert mixture["docs"] | {} == {"weight": 0.6, "share": 0.6, "tokens": 600, "documents": 6, "unique_tokens": 1200,
                                    "unique_documents": 12, "epochs": 0.5}
    assert (mixture["code"]["share"], mixture["code"]["epochs"]) == (0.4, 2.0)
    assert mixture_csv(mixture).splitlines() == ["source,weight,share,tokens,documents,epochs",
                                                 "docs,0.6,0.6,600,6,0.5", "code,0.4,0.4,400,8,2.0"]



# --- bad sources: one clear error naming the key ---------------------------------------------------

from lmforge.core.params import parse_params  # noqa: E402

DOCS = {"name": "docs", "files": ["data/corpus/docs/*.txt"]}
CODE = {"name": "code", "files": ["data/code/*.jsonl"], "text_field": "content"}


def mixed(sources: list[dict], weights: dict | None = None, **data: object) -> dict:
    return {"data": {"source": "sources", "sources": sources, **data},
            "mix": {"weights": {s["name"]: 1.0 for s in sources} if weights is None else weights}}


def test_two_weighted_sources_are_valid():
    params = parse_params(mixed([DOCS, CODE], {"docs": 0.7, "code": 0.3}))
    assert params.data.source_names == ["docs", "code"]
    assert params.data.sources[1].text_field == "content"


@pytest.mark.parametrize("raw, message", [
    (mixed([DOCS, CODE], {"docs": 0.7, "code": 0}), r"mix.weights: weight of 'code' is 0.0: .* must be positive"),
    (mixed([DOCS, CODE], {"docs": 0.7, "code": -1}), r"mix.weights: weight of 'code' is -1.0"),
    (mixed([DOCS, {**CODE, "name": "docs"}]), r"data.sources\[1\].name 'docs' is listed twice"),
    (mixed([DOCS], files=["other/*.txt"]), r"data.files \['other/\*.txt'\] is read only when data.source is 'files'"),
    (mixed([]), r"data.source is 'sources' but data.sources is empty"),
    ({"data": {"source": "files", "sources": [DOCS]}}, r"data.sources lists 1 sources but data.source is 'files'"),
    ({"mix": {"weights": {"docs": 1.0}}}, r"mix.weights \['docs'\] weighs named sources, but data.source is 'builtin'"),
    (mixed([DOCS, CODE], {"docs": 1.0}), r"mix.weights has no weight for data.sources \['code'\]"),
    (mixed([DOCS], {"docs": 1.0, "web": 2.0}), r"mix.weights names \['web'\], which data.sources does not list"),
    (mixed([{**DOCS, "name": "my docs"}]), r"data.sources.0.name: source name 'my docs': use 1-64 letters"),
    (mixed([{**DOCS, "files": []}]), r"data.sources.0.files: a source needs at least one glob"),
    (mixed([{"name": "docs"}]), r"data.sources.0.files: Field required"),
    (mixed([{**DOCS, "weight": 0.7}]), r"data.sources.0: a source's weight goes in mix.weights \(docs: 0.7\)"),
    (mixed([{**DOCS, "text": "x"}]), r"unknown key 'data.sources.0.text'"),
])
def test_bad_sources_are_one_error_naming_the_key(raw, message):
    with pytest.raises(LmforgeError, match=message):
        parse_params(raw)


def test_a_source_whose_files_match_nothing_is_named_by_its_key(tmp_path, monkeypatch):
    from lmforge.data.ingest_job import plan_tasks

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/corpus/docs").mkdir(parents=True)
    (tmp_path / "data/corpus/docs/a.txt").write_text("Some text of the docs source.", encoding="utf-8")
    params = parse_params(mixed([DOCS, CODE]))
    with pytest.raises(LmforgeError, match=r"data.sources\[1\].files: 'data/code/\*.jsonl' matches no files"):
        plan_tasks(params.data, tmp_path / "staging")
