from lmforge.data.documents import document_id, make_document, split_of


def test_id_is_derived_from_content_only():
    assert document_id("hello") == document_id("hello")
    assert document_id("hello") != document_id("hello!")
    assert make_document("hello", "files")["id"] == make_document("hello", "stdlib", module="m")["id"]


def test_split_is_a_pure_function_of_the_id():
    ids = [document_id(f"doc {i}") for i in range(2000)]
    first = [split_of(i, 0.1) for i in ids]
    assert [split_of(i, 0.1) for i in reversed(ids)] == first[::-1]


def test_split_fraction_is_close_to_requested():
    ids = [document_id(f"doc {i}") for i in range(20000)]
    val = sum(split_of(i, 0.1) == "val" for i in ids) / len(ids)
    assert 0.09 < val < 0.11


def test_raising_val_fraction_only_moves_documents_into_val():
    ids = [document_id(f"doc {i}") for i in range(5000)]
    small = {i for i in ids if split_of(i, 0.05) == "val"}
    large = {i for i in ids if split_of(i, 0.2) == "val"}
    assert small < large
