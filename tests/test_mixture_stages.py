"""Two weighted sources through ingest, clean and tokenize (real `dvc repro`, seconds): each keeps
its name on every document, dedup keeps a document of two sources in the first listed, the train
split gets the asked shares (same bytes twice), each source's val rows stay apart, and a new
weight makes tokenize stale but not ingest or clean."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import make_repo, make_texts, run, tiny_params, write_params
from lmforge.core.errors import LmforgeError
from lmforge.core.params_yaml import params_yaml
from lmforge.data.tokens.shards import ShardReader
from lmforge.data.tokens.tokenizer import load_tokenizer

# "docs" is prose (every text starts "Document i."); "code" has calls in it ("read()"), so a decoded
# val row tells which source it came from. Code is the smaller source: a 50/50 mix repeats it.
DOCS = make_texts(150, seed=0)
CODE = [f"Snippet {i}. " + " ".join(f"{w}()" if k % 4 == 0 else w for k, w in enumerate(text.split()[2:]))
        for i, text in enumerate(make_texts(30, seed=1))]
SHARED = DOCS[0]  # in both sources: kept once, in docs, the source listed first
WEIGHTS = {"docs": 0.5, "code": 0.5}
SOURCES = {
    "data": {"source": "sources", "files": ["data/corpus/**/*.txt"], "val_fraction": 0.2,
             # code is listed second though its files sort first: "first" is the order of data.sources
             "sources": [{"name": "docs", "files": ["data/corpus/docs/*.txt"]},
                         {"name": "code", "files": ["data/corpus/code/*.jsonl"], "text_field": "content"}]},
    "mix": {"weights": WEIGHTS},
    "engine": {"workers": 1},
}
# The asked shares are met up to the partial epochs' draw by document hash: with ~120 docs and ~24
# code train documents, one document more or less moves a share by ~0.005-0.01 and the draw's sd is
# ~0.02; the corpus is fixed, so the figure is the same every run: 0.05 is a bound, not a flake margin.
SHARE_TOLERANCE = 0.05


def shards(root: Path) -> dict[str, str]:
    manifest = json.loads((root / "data/shards/manifest.json").read_text(encoding="utf-8"))
    return {shard["file"]: shard["sha256"] for split in manifest["splits"].values() for shard in split["shards"]}


@pytest.fixture(scope="module")
def mixed_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("mixed"), tiny_params(**SOURCES), n_docs=0)
    (root / "data/corpus/docs").mkdir(parents=True)
    for i, text in enumerate(DOCS):
        (root / f"data/corpus/docs/doc{i:04d}.txt").write_text(text, encoding="utf-8")
    (root / "data/corpus/code").mkdir()
    rows = [{"content": text} for text in [*CODE, SHARED]]
    (root / "data/corpus/code/code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run(["dvc", "repro", "tokenize"], root)
    return root


def documents(root: Path, stage: str) -> list[dict]:
    return [row for part in sorted((root / "data" / stage).glob("part-*.parquet"))
            for row in pq.read_table(part, columns=["id", "text", "source"]).to_pylist()]


def test_every_document_carries_its_source_through_clean(mixed_repo):
    raw, clean = documents(mixed_repo, "raw"), documents(mixed_repo, "clean")
    assert {doc["source"] for doc in raw} == {"docs", "code"}
    assert all(doc["source"] == ("code" if doc["text"].startswith("Snippet") else "docs") for doc in clean)
    assert sum(doc["source"] == "code" for doc in clean) == len(CODE)


def test_dedup_across_sources_keeps_the_first_listed(mixed_repo):
    assert sorted(doc["source"] for doc in documents(mixed_repo, "raw") if doc["text"] == SHARED) == ["code", "docs"]
    assert [doc["source"] for doc in documents(mixed_repo, "clean") if doc["text"] == SHARED] == ["docs"]


def test_the_train_split_gets_the_asked_shares(mixed_repo):
    mixture = json.loads((mixed_repo / "data/tokenizer/metrics.json").read_text(encoding="utf-8"))["mixture"]
    for name, weight in WEIGHTS.items():
        assert mixture[name]["weight"] == weight
        assert mixture[name]["share"] == pytest.approx(weight, abs=SHARE_TOLERANCE)
    assert mixture["code"]["epochs"] > 2 and mixture["docs"]["epochs"] < 1  # repeated, subsampled
    assert mixture["code"]["documents"] > mixture["code"]["unique_documents"]
    csv = (mixed_repo / "data/tokenizer/mixture.csv").read_text(encoding="utf-8").splitlines()
    assert csv[0] == "source,weight,share,tokens,documents,epochs" and [row.split(",")[0] for row in csv[1:]] == ["docs", "code"]


def test_the_mixture_is_an_mlflow_table_of_the_tokenize_run(mixed_repo):
    tables = sorted(mixed_repo.glob("mlruns/*/artifacts/mixture.json"))  # one per tokenize run
    assert tables
    logged = json.loads(tables[0].read_text(encoding="utf-8"))
    rows = {row[0]: dict(zip(logged["columns"], row)) for row in logged["data"]}
    assert sorted(rows) == ["code", "docs"] and rows["docs"]["weight"] == 0.5


def test_each_sources_val_rows_stay_apart(mixed_repo):
    shards_dir, tokenizer = mixed_repo / "data/shards", load_tokenizer(mixed_repo / "data/tokenizer/tokenizer.json")
    val = {name: ShardReader(shards_dir, "val", source=name) for name in WEIGHTS}
    assert all(len(rows) > 0 for rows in val.values())
    assert sum(len(rows) for rows in val.values()) == len(ShardReader(shards_dir, "val"))
    docs_text = tokenizer.decode([int(i) for block in val["docs"].blocks() for i in block.reshape(-1)])
    code_text = tokenizer.decode([int(i) for block in val["code"].blocks() for i in block.reshape(-1)])
    assert "Document" in docs_text and "()" not in docs_text
    assert "()" in code_text and "Document" not in code_text


def test_a_source_the_shards_do_not_keep_apart_is_an_error_naming_it(mixed_repo):
    with pytest.raises(LmforgeError, match=r"keeps no val rows of source 'web' apart \(named sources: \['code', 'docs'\]\)"):
        ShardReader(mixed_repo / "data/shards", "val", source="web")


def test_mixing_is_deterministic(mixed_repo):
    before = shards(mixed_repo)
    run(["dvc", "repro", "-f", "-s", "tokenize"], mixed_repo)
    assert shards(mixed_repo) == before


def test_a_new_weight_reruns_tokenize_not_ingest_or_clean(mixed_repo):
    params = yaml.safe_load((mixed_repo / "params.yaml").read_text(encoding="utf-8"))
    try:
        params["mix"]["weights"]["code"] = 0.2
        (mixed_repo / "params.yaml").write_text(params_yaml(params), encoding="utf-8")
        stale = json.loads(run(["dvc", "status", "--json"], mixed_repo).stdout)
    finally:
        write_params(mixed_repo, **SOURCES)
    assert "tokenize" in stale and "pretrain" in stale
    assert "ingest" not in stale and "clean" not in stale


def test_evaluate_reports_a_val_loss_per_source_beside_the_asked_weights(mixed_repo, monkeypatch):
    """evaluate's LM loss on each source's own val rows (a fresh tiny model: the figures' shape is what
    is checked, pretraining adds nothing to it), and the report's mixture table."""
    import shutil

    import torch

    from lmforge.core.params import load_params
    from lmforge.evaluate import evaluation
    from lmforge.evaluate.report import render_report_md
    from lmforge.model.decoder import ModelConfig, Transformer

    monkeypatch.chdir(mixed_repo)
    (mixed_repo / "models/pretrain").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mixed_repo / "data/tokenizer/tokenizer.json", mixed_repo / "models/pretrain/tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=4, max_seq_len=32))
    lm = evaluation.evaluate_lm(load_params(), model, None)
    by_source = evaluation.headline(lm, None, None, None)["val_loss_by_source"]
    assert sorted(by_source) == ["code", "docs"] and all(loss > 0 for loss in by_source.values())
    mixture = evaluation.training_mixture(lm)
    assert {name: figures["val_loss"] for name, figures in mixture.items()} == by_source
    report = render_report_md(lm=lm, mixture=mixture)
    assert "## Training mixture" in report
    assert f"| docs | 0.500 | {mixture['docs']['share']:.3f} |" in report
    shutil.rmtree(mixed_repo / "models")
