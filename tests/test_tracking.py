"""MLflow tracking records runs and never fails a job."""
import warnings

import pytest

from dnd.tracking import Tracker, job_tracker


def _runs(uri):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("exp")
    return c.search_runs([exp.experiment_id])


def test_finished_and_failed_runs(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = {"name": "exp", "seed": 0}
    with job_tracker(cfg, "train_tokenizer", "d1") as t:
        t.log_metrics({"loss": 0.5}, step=3)
    with pytest.raises(ValueError):
        with job_tracker(cfg, "train_generator", "g") as t:
            raise ValueError("nan loss")
    runs = {r.data.tags["stage"]: r for r in _runs(uri)}
    assert runs["train_tokenizer"].info.status == "FINISHED"
    assert runs["train_tokenizer"].data.metrics["loss"] == 0.5
    assert runs["train_tokenizer"].data.params["seed"] == "0"
    assert {"variant", "config_hash", "git_commit", "rule"} <= runs["train_tokenizer"].data.tags.keys()
    assert runs["train_generator"].info.status == "FAILED"


def test_unreachable_server_warns_and_continues(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tracker("exp", "job", params={"a": 1}) as t:
            t.log_metrics({"loss": 1.0})
            done = True
    assert done
    assert any("not logged" in str(x.message) for x in w)
