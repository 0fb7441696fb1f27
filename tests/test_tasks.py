from lmforge.data.documents import make_document, split_of
from lmforge.finetune.builtin_tasks import classify_examples, first_line, sft_examples


def _docs(n_per_package: dict[str, int]) -> list[dict]:
    docs = []
    for package, n in n_per_package.items():
        for i in range(n):
            docs.append(make_document(f"Docstring {i} of {package}.", "stdlib", package=package, kind="class"))
    docs.append(make_document("A language topic.", "pydoc_topics", package="pydoc_topics", kind="topic"))
    return docs


def test_test_split_is_the_pretraining_val_split():
    docs = _docs({"json": 400, "email": 300, "http": 200})
    train, test, _ = classify_examples(docs, 0.1, top_k=3, max_per_class=1000, seed=0)
    assert {split_of(r["id"], 0.1) for r in test} == {"val"}
    assert {split_of(r["id"], 0.1) for r in train} == {"train"}


def test_labels_are_the_top_k_training_packages_and_classes_are_capped():
    docs = _docs({"json": 400, "email": 300, "http": 200, "csv": 10})
    train, test, labels = classify_examples(docs, 0.1, top_k=3, max_per_class=150, seed=0)
    assert labels == ["email", "http", "json"]
    counts = {label: sum(r["label"] == label for r in train) for label in labels}
    assert counts["json"] == counts["email"] == 150 and counts["http"] <= 150
    assert all(r["label"] in labels for r in test)


def test_sft_pairs_a_signature_with_the_summary_line():
    doc = make_document("\n  Return the answer.\n\n  More details here.", "stdlib", kind="function", signature="def f(x)")
    other = make_document("A class.", "stdlib", kind="class")
    train, test = sft_examples([doc, other], 0.0001, 300, 200)
    assert train + test == [{"id": doc["id"], "prompt": "def f(x)", "response": "Return the answer."}]
    assert first_line("\n\n  Summary.\nrest") == "Summary."
