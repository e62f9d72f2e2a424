"""Thin MLflow wrapper: one run per job, never required for correctness.

MLflow records; Snakemake decides what runs. Every call here is guarded: when the
tracking store is unreachable the job goes on, its outputs are still written, and a
warning says what was not logged. The default store is `sqlite:///results/mlflow.db`
(relative to the working directory); `MLFLOW_TRACKING_URI` overrides it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from dnd.config import config_hash

DEFAULT_URI = "sqlite:///results/mlflow.db"


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = str(d)[:500]
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Context manager around one MLflow run.

    `with Tracker(experiment, run_name, params=..., tags=...) as t: t.log_metrics({...}, step)`.
    A failed job (an exception leaving the block) marks the run FAILED and re-raises.
    """

    def __init__(self, experiment: str, run_name: str, *, params: dict | None = None,
                 tags: dict | None = None, enabled: bool = True):
        self.experiment, self.run_name = experiment, run_name
        self.params, self.tags = params or {}, tags or {}
        # Under torchrun only rank 0 records; the other processes train silently.
        self.enabled = enabled and os.environ.get("DND_TRACKING", "1") != "0" and os.environ.get("RANK", "0") == "0"
        self.client = None
        self.run_id = None
        self.dropped = 0

    def _warn(self, what: str, err: Exception) -> None:
        self.dropped += 1
        if self.dropped <= 3:
            warnings.warn(f"MLflow: {what} not logged ({type(err).__name__}: {str(err)[:200]}); "
                          f"the job continues and its outputs are written", stacklevel=3)

    def __enter__(self) -> "Tracker":
        if not self.enabled:
            return self
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            import mlflow
            from mlflow.tracking import MlflowClient

            uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
            if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
                Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self._create_experiment(mlflow)
            tags = {"git_commit": git_commit(), "mlflow.runName": self.run_name, **{k: str(v) for k, v in self.tags.items()}}
            run = self.client.create_run(exp_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            flat = _flatten(self.params)
            items = list(flat.items())
            from mlflow.entities import Param
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        except Exception as e:  # noqa: BLE001 - tracking must never fail a job
            self._warn("run start", e)
            self.client = self.run_id = None
        return self

    def _create_experiment(self, mlflow) -> str:
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # noqa: BLE001 - a parallel job may have created it first
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id is None:
            return
        try:
            from mlflow.entities import Metric
            import time
            ts = int(time.time() * 1000)
            ms = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
            self.client.log_batch(self.run_id, metrics=ms)
        except Exception as e:  # noqa: BLE001
            self._warn(f"metrics at step {step}", e)

    def log_artifact(self, path: str | Path) -> None:
        if self.run_id is None or not Path(path).exists():
            return
        try:
            self.client.log_artifact(self.run_id, str(path))
        except Exception as e:  # noqa: BLE001
            self._warn(f"artifact {path}", e)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is None:
            return
        try:
            self.client.set_terminated(self.run_id, status="FAILED" if exc_type else "FINISHED")
        except Exception as e:  # noqa: BLE001
            self._warn("run end", e)
        if self.dropped:
            print(f"warning: MLflow dropped {self.dropped} logging call(s) for run {self.run_name}", file=sys.stderr)


class NullTracker(Tracker):
    """A tracker that records nothing (tests, library use)."""

    def __init__(self):
        super().__init__("", "", enabled=False)


def job_tracker(cfg: dict, stage: str, variant: str = "", *, params: dict | None = None,
                extra_tags: dict | None = None) -> Tracker:
    tags = {"stage": stage, "variant": variant, "config_hash": config_hash(cfg),
            "rule": os.environ.get("DND_RULE", stage), "experiment": cfg.get("name", "")}
    tags.update(extra_tags or {})
    return Tracker(cfg.get("name", "dnd"), f"{stage}:{variant}" if variant else stage,
                   params=params if params is not None else cfg, tags=tags)
