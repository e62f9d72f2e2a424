"""Numerical faults, a dead tracking server, a full disk and bad input: clear errors, no lost work."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dnd.checkpoint import load_checkpoint
from tests.stages import ROOT, env, stage, write_config

pytestmark = pytest.mark.slow


def _runs(tmp, stage_name):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == stage_name]


def test_nan_loss_stops_keeps_checkpoint_and_fails_run(tiny_data, tiny_codes, tmp_path):
    _, data = tiny_data
    # An absurd learning rate makes the loss blow up to inf/NaN after a few steps.
    cfg = write_config(tmp_path, generators__g__train__lr=1e12, generators__g__train__warmup_steps=0,
                       generators__g__train__grad_clip=0.0, generators__g__train__ckpt_every=1,
                       generators__g__train__log_every=1, generators__g__train__steps=200)
    out = tmp_path / "gen" / "model.pt"
    r = stage(["train_generator", "--config", cfg, "--generator", "g", "--codes", tiny_codes,
               "--data", data / "train", "--out", out], tmp_path, check=False)
    assert r.returncode != 0
    assert "non-finite" in r.stderr and "at step" in r.stderr
    assert not out.exists()
    resume = out.parent / "resume.pt"
    if resume.exists():  # the last good checkpoint is loadable and finite
        ck = load_checkpoint(resume)
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    [run] = _runs(tmp_path, "train_generator")
    assert run.info.status == "FAILED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_server_dies_mid_run(tiny_data, tmp_path):
    cfg, data = tiny_data
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--workers", "1"],
                              cwd=tmp_path, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        out = tmp_path / "tok" / "model.pt"
        job = subprocess.Popen([sys.executable, "-m", "dnd", "train_tokenizer", "--config", str(cfg), "--tokenizer",
                                "d2", "--data", str(data / "train"), "--out", str(out)], cwd=tmp_path,
                               env=env(tmp_path, MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                                       MLFLOW_HTTP_REQUEST_TIMEOUT="3"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (out.parent / "resume.pt").exists():  # the run has started and logged
            assert job.poll() is None, job.stderr.read()
            time.sleep(0.05)
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-2000:]
    assert out.is_file() and (out.parent / "train_log.csv").is_file()
    assert "not logged" in stderr


def test_bad_data_names_the_file(tmp_path):
    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(root / "cat" / f"{i}.png")
        Image.fromarray(np.full((40, 40, 3), 50 * i, np.uint8)).save(root / "dog" / f"{i}.jpg")
    bad = root / "dog" / "broken.jpg"
    bad.write_bytes((root / "dog" / "0.jpg").read_bytes()[:100])
    cfg = write_config(tmp_path, data={"source": "image_folder", "image_size": 32, "num_train": 4, "num_val": 2,
                                       "image_folder": {"root": str(root)}})
    r = stage(["prepare_data", "--config", cfg, "--out", tmp_path / "data"], tmp_path, check=False)
    assert r.returncode != 0 and "broken.jpg" in r.stderr
    assert not list((tmp_path / "data").rglob("manifest.json"))
    cfg = write_config(tmp_path, data={"source": "image_folder", "image_size": 32, "num_train": 4, "num_val": 2,
                                       "skip_bad_images": True, "image_folder": {"root": str(root)}})
    stage(["prepare_data", "--config", cfg, "--out", tmp_path / "data"], tmp_path)
    assert (tmp_path / "data" / "train" / "manifest.json").is_file()


def test_snakemake_rejects_bad_config_before_any_job(tmp_path):
    (tmp_path / "experiments").mkdir()
    write_config(tmp_path / "experiments", name="broken", generators__g__head_layers=[0, 5])
    r = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                        str(tmp_path), "--cores", "1", "--config", "experiments=[broken]"],
                       capture_output=True, text=True, env=env(tmp_path), timeout=300)
    assert r.returncode != 0
    assert "generators.g.head_layers" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()
