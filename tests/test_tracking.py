import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmforge.core.params import DataParams
from lmforge.core.digests import content_hash
from lmforge.track.lineage import input_hashes
from lmforge.core.params import flatten
from lmforge.track.runs import OUTPUT_TAG, stage_run


def test_flatten_nests_keys_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": 3}) == {"a.b": 1, "a.c.d": [2], "e": 3}


def test_directory_hash_changes_with_any_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("one")
    before = content_hash(tmp_path / "d")
    (tmp_path / "d" / "x.txt").write_text("two")
    assert content_hash(tmp_path / "d") != before and before.endswith(".dir")


def _write_lock(root, stages):
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False))


def test_input_hash_is_the_producers_output_not_a_downstream_stages_stale_dep(tmp_path):
    """dvc.lock while `dvc repro` runs `b` after `a` reran: a's outs hold the new md5 (DVC writes each
    stage's entry as it finishes), b's deps still the md5 b last ran with. b read what a made."""
    (tmp_path / "x.bin").write_bytes(b"new")
    _write_lock(tmp_path, {
        "a": {"cmd": "a", "outs": [{"path": "x.bin", "hash": "md5", "md5": content_hash(tmp_path / "x.bin"), "size": 3}]},
        "b": {"cmd": "b", "deps": [{"path": "x.bin", "hash": "md5", "md5": "0" * 32, "size": 3}], "outs": []},
    })
    assert input_hashes(["x.bin"], tmp_path) == {"x.bin": content_hash(tmp_path / "x.bin")}


def test_input_hash_trusts_the_producers_record_only_while_size_and_file_count_match(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abc")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.txt").write_text("1")
    _write_lock(tmp_path, {"a": {"cmd": "a", "outs": [
        {"path": "x.bin", "hash": "md5", "md5": "f" * 32, "size": 3},
        {"path": "d", "hash": "md5", "md5": "e" * 32 + ".dir", "size": 1, "nfiles": 1},
    ]}})
    # As recorded: DVC's md5s are taken without reading the files (these are not the files' md5s).
    assert input_hashes(["x.bin", "d"], tmp_path) == {"x.bin": "f" * 32, "d": "e" * 32 + ".dir"}
    (tmp_path / "x.bin").write_bytes(b"abcd")  # changed outside DVC: computed from the bytes
    (tmp_path / "d" / "empty.txt").write_text("")
    assert input_hashes(["x.bin", "d"], tmp_path) == {"x.bin": content_hash(tmp_path / "x.bin"),
                                                      "d": content_hash(tmp_path / "d")}


def test_tracking_uri_from_the_environment_is_used(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run("ingest", {"data": DataParams()}, inputs=[], root=tmp_path) as run:
        run.log_metrics({"documents": 3, "nested": {"x": 1.5}, "label": "skipped"})
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("lmforge").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "ingest"
    assert runs[0].data.metrics == {"ingest/documents": 3.0, "ingest/nested.x": 1.5}
    assert runs[0].data.params["data.source"] == "builtin"
    assert not (tmp_path / "mlflow.db").exists()


def test_failed_stage_marks_its_run_failed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError):
        with stage_run("clean", {}, inputs=[], root=tmp_path):
            raise RuntimeError("boom")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert run.info.status == "FAILED"


def test_every_run_and_registered_model_reads_well_in_the_ui(tiny_repo):
    """After `dvc repro`: the experiment, each stage's run, both registered models and their
    versions carry descriptions; each stage's metrics are its own (`<stage>/...`), so no name
    means two things; each registered version carries its own figures."""
    client = MlflowClient(f"sqlite:///{tiny_repo}/mlflow.db")
    experiment = client.get_experiment_by_name("lmforge")
    assert experiment.tags.get("mlflow.note.content")
    assert experiment.artifact_location.startswith("file://")
    runs = client.search_runs([experiment.experiment_id])
    stages = {r.data.tags["lmforge.stage"] for r in runs}
    assert {"ingest", "clean", "tokenize", "pretrain", "finetune_data", "finetune", "evaluate", "promote"} <= stages
    for run in runs:
        assert run.data.tags.get("mlflow.note.content"), run.info.run_name
        # MLflow's system metrics (training runs) are its own `system/...`, one meaning in every run
        stage = run.data.tags["lmforge.stage"]
        assert all(name.startswith((f"{stage}/", "system/")) for name in run.data.metrics), run.info.run_name
    for name in ("lmforge-pretrain", "lmforge-finetune"):
        assert client.get_registered_model(name).description
        (version,) = client.search_model_versions(f"name = '{name}'")[:1]
        assert version.description and version.tags["lmforge.weights_md5"]
        assert any(key.endswith("val_loss") for key in version.tags)
        logged = client.get_logged_model(version.model_id) if getattr(version, "model_id", None) else None
        assert logged is None or logged.name == name
    # report.md names the training runs by id: evaluate finds them by the key in their checkpoints' run.json
    report = (tiny_repo / "reports/report.md").read_text()
    for stage in ("pretrain", "finetune"):
        (trained,) = [r for r in runs if r.data.tags["lmforge.stage"] == stage]
        assert f"MLflow run `{trained.info.run_id}`" in report, stage


def test_each_stage_run_is_tagged_with_the_md5s_dvc_lock_records_for_its_outputs(tiny_repo):
    """How a flow whose stage is a cache hit finds the run that made the stage's outputs."""
    import yaml

    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())["stages"]
    client = MlflowClient(f"sqlite:///{tiny_repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    for stage, entry in lock.items():
        run = next(r for r in runs if r.data.tags["lmforge.stage"] == stage)
        tagged = {key[len(OUTPUT_TAG):]: value for key, value in run.data.tags.items() if key.startswith(OUTPUT_TAG)}
        recorded = {out["path"]: out["md5"] for out in entry["outs"] if not out["path"].startswith("checkpoints/")}
        assert tagged == recorded, stage


def test_a_logged_model_skips_mlflows_requirements_check_and_loads_as_before(tmp_path, monkeypatch):
    """log_torch_model keeps MLflow from checking this environment against the model's requirements
    (it maps every installed distribution to its modules first: about a second a model). The check
    could only pass, since the requirements are read from this environment; the files logged are
    the same, and the model loads through MLflow as the registry gives it."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.utils import requirements_utils

    from lmforge.track.model_env import model_requirements
    from lmforge.track.registration import model_signature

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    checked: list[str] = []
    real_check = requirements_utils._check_requirement_satisfied
    monkeypatch.setattr(requirements_utils, "_check_requirement_satisfied", lambda req: checked.append(req))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    example = np.ones((2, 4), dtype=np.float32)
    with stage_run("pretrain", {}, inputs=[], root=tmp_path) as run:
        version = run.log_torch_model(model, "tiny", model_signature({"x": ("float32", (-1, 4))},
                                                                     {"y": ("float32", (-1, 3))}), example)
    assert version == "1" and not run.failed
    assert checked == [], "MLflow checked the model's requirements against the environment"

    local = mlflow.artifacts.download_artifacts("models:/tiny/1", dst_path=str(tmp_path / "dl"))
    logged = (tmp_path / "dl" / "requirements.txt").read_text().split()
    assert logged == [f"mlflow=={mlflow.__version__}", *model_requirements()], local
    assert all(real_check(req) is None for req in logged)  # what the skipped check would have found
    loaded = mlflow.pytorch.load_model("models:/tiny/1")
    x = torch.from_numpy(example)
    torch.testing.assert_close(loaded(x), model(x).detach())
