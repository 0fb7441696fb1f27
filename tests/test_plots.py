"""What `dvc plots show` draws from a repository where the pipeline ran (real DVC, no mocks), and
`make plots` (lmforge.evaluate.plots): the same Vega-Lite specs rendered to files with no network."""

from __future__ import annotations

import json
import math
import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest

from lmforge.evaluate.plots import dvc_plot_specs, render
from lmforge.core.params import flatten

from conftest import REPO, run

# plot name -> the x and y fields dvc.yaml names and the Vega-Lite type each must have
# (quantitative for steps, losses and scores, nominal for class labels).
EXPECTED = {
    "pretrain_loss": {"x": ("step", "quantitative"), "y": ("dvc_inferred_y_value", "quantitative")},
    "finetune_loss": {"x": ("step", "quantitative"), "y": ("dvc_inferred_y_value", "quantitative")},
    "per_class_f1": {"x": ("f1", "quantitative"), "y": ("label", "nominal")},
    "confusion_matrix": {"x": ("predicted", "nominal"), "y": ("actual", "nominal")},
    "source_mixture": {"x": ("share", "quantitative"), "y": ("source", "nominal")},
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shown(tiny_repo) -> dict[str, list[dict[str, Any]]]:
    result = json.loads(run(["dvc", "plots", "show", "--json"], tiny_repo).stdout)
    assert not result.get("errors"), result["errors"]
    return result["data"]


def encodings(spec: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (channel, definition) of x and y in a spec, layers and facets included."""
    if isinstance(spec, dict):
        for channel, definition in (spec.get("encoding") or {}).items():
            if channel in ("x", "y") and isinstance(definition, dict) and "field" in definition:
                yield channel, definition
        for value in spec.values():
            yield from encodings(value)
    elif isinstance(spec, list):
        for item in spec:
            yield from encodings(item)


def test_each_plot_draws_fields_its_data_has_with_the_right_types(shown):
    assert set(shown) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        (renderer,) = shown[name]
        spec = renderer["content"]
        rows = spec["data"]["values"]
        assert rows, name
        found = {(channel, d["field"], d["type"]) for channel, d in encodings(spec)}
        assert found == {(channel, field, kind) for channel, (field, kind) in expected.items()}, name
        for field, _ in expected.values():
            assert all(field in row for row in rows), (name, field)


def test_loss_plots_hold_train_and_val_curves_with_no_cell_vega_would_read_as_zero(shown):
    for name in ("pretrain_loss", "finetune_loss"):
        rows = shown[name][0]["content"]["data"]["values"]
        by_curve: dict[str, list[float]] = {}
        for row in rows:
            # "" would be drawn as 0 by Vega; "nan" is skipped, so val draws only its eval steps.
            by_curve.setdefault(row["field"], []).append(float(row["dvc_inferred_y_value"]))
        assert set(by_curve) == {"train_loss", "val_loss"}, name
        assert all(math.isfinite(v) and v > 0 for v in by_curve["train_loss"]), name
        val = [v for v in by_curve["val_loss"] if not math.isnan(v)]
        assert 0 < len(val) < len(by_curve["val_loss"]) and all(v > 0 for v in val), name


def test_plots_have_readable_titles_and_axis_labels(shown):
    for name, renderers in shown.items():
        spec = renderers[0]["content"]
        title = spec["title"]["text"]
        assert title and "/" not in title and "." not in title, (name, title)
        for _, definition in encodings(spec):
            assert definition["title"] and not definition["title"].startswith("dvc_"), (name, definition)


def test_dvc_metrics_are_the_figures_compared_across_experiments(tiny_repo):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout)[""]["data"]
    assert set(shown) == {"data/clean/metrics.json", "data/tokenizer/metrics.json", "reports/pretrain/metrics.json",
                          "reports/finetune/metrics.json", "reports/metrics.json", "reports/promotion.json",
                          "reports/harness.json"}
    assert set(shown["data/clean/metrics.json"]["data"]) == {"documents_in", "documents_out", "kept_byte_fraction"}
    assert set(shown["data/tokenizer/metrics.json"]["data"]) == {"train.tokens", "bytes_per_token"}
    clean = json.loads((tiny_repo / "data/clean/stats.json").read_text())
    assert shown["data/clean/metrics.json"]["data"]["documents_out"] == clean["documents_out"]
    # Numbers only: a string (task, method), a flag or a constant of the params has no column here.
    values = {f"{path}:{key}": value for path, entry in shown.items() for key, value in flatten(entry["data"]).items()}
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()), values
    assert not [name for name in values if name.rsplit(":", 1)[1] in ("world_size", "parameters", "total_params",
                                                                       "trainable_params", "n_labels")]


def test_render_draws_dvc_specs_to_svg_and_png_with_the_network_cut(tiny_repo, tmp_path, monkeypatch):
    specs, errors = dvc_plot_specs(tiny_repo)  # DVC runs in its own process, before the cut
    assert set(specs) == set(EXPECTED) and errors == {}

    def no_network(*args, **kwargs):
        raise OSError("network used while rendering")

    # The renderer is native code: this cut catches Python-side fetches; allowed_base_urls=[] in
    # render() is what stops the renderer's own (test below).
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name, spec in specs.items():
        svg = render(spec, tmp_path / f"{name}.svg")
        root = ET.fromstring(svg.read_text(encoding="utf-8"))
        assert root.tag.endswith("svg") and len(list(root.iter())) > 20, name
        assert render(spec, tmp_path / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE), name


def test_render_refuses_a_spec_that_would_fetch_its_data(tmp_path):
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"url": "https://example.com/a.csv"},
            "mark": "point", "encoding": {"x": {"field": "a", "type": "quantitative"}}}
    with pytest.raises(ValueError, match="not allowed"):
        render(spec, tmp_path / "remote.svg")
    assert not (tmp_path / "remote.svg").exists()


def test_make_plots_entry_point_writes_one_image_per_plot(tiny_repo, tmp_path):
    run(["python", "-m", "lmforge.evaluate.plots", "--out", str(tmp_path), "--format", "png"], tiny_repo)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.png" for name in EXPECTED)


def test_entry_point_outside_a_pipeline_run_is_a_clear_error(tmp_path):
    result = run(["python", "-m", "lmforge.evaluate.plots"], tmp_path, check=False, PYTHONPATH=str(REPO))
    assert result.returncode == 2 and "has the pipeline run" in result.stderr and "Traceback" not in result.stderr


def test_a_plot_without_data_is_reported_and_its_old_image_removed(tmp_path, monkeypatch, caplog):
    import lmforge.evaluate.plots

    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"values": [{"a": 1, "b": 2}]},
            "mark": "point", "encoding": {"x": {"field": "a", "type": "quantitative"}}}
    missing = {"per_class_f1": "No such file or directory: 'reports/figures/per_class.csv'"}  # as after an SFT run
    monkeypatch.setattr(lmforge.evaluate.plots, "dvc_plot_specs", lambda root: ({"pretrain_loss": spec}, missing))
    (tmp_path / "per_class_f1.svg").write_text("<svg/>")  # drawn by an earlier classify run
    written = lmforge.evaluate.plots.render_dvc_plots(tmp_path, tmp_path)
    assert [p.name for p in written] == ["pretrain_loss.svg"]
    assert not (tmp_path / "per_class_f1.svg").exists()
    assert "per_class_f1" in caplog.text and "per_class.csv" in caplog.text


def test_loss_plots_draw_train_and_val_in_two_colours(shown):
    for name in ("pretrain_loss", "finetune_loss"):
        colour = shown[name][0]["content"]["encoding"]["color"]
        assert colour["field"] == "field", name  # one colour per curve, not per revision
        assert dict(zip(colour["scale"]["domain"], colour["scale"]["range"])).keys() == {"train_loss", "val_loss"}
        assert len(set(colour["scale"]["range"])) == 2, name


def test_the_confusion_matrix_image_shows_the_count_in_each_cell(tiny_repo, tmp_path):
    specs, _ = dvc_plot_specs(tiny_repo)
    svg = ET.fromstring(render(specs["confusion_matrix"], tmp_path / "confusion.svg").read_text(encoding="utf-8"))
    cells = [text.text for group in svg.iter() if "role-mark" in group.get("class", "") and "mark-text" in group.get("class", "")
             for text in group.iter() if text.tag.endswith("text") and text.text]
    records = json.loads((tiny_repo / "reports/figures/confusion_matrix.json").read_text())
    labels = sorted({r["actual"] for r in records} | {r["predicted"] for r in records})
    counts = [sum(1 for r in records if (r["actual"], r["predicted"]) == (a, p)) for a in labels for p in labels]
    # A pair no example fell in has no mark (blank, as in DVC's own confusion template): the tiny
    # classifier may make no error at all.
    assert sorted(cells, key=int) == sorted((str(n) for n in counts if n), key=int) and cells
