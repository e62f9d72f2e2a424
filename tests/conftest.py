"""Shared fixtures: a tiny experiment's data, tokenizer and codes, made once per session.

Tests run torch on one thread: on a 2-core machine OpenMP threads of concurrent
processes (Snakemake jobs, subprocess stages) otherwise spin against each other.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.stages import stage, write_config  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(config path, data folder) prepared once for the whole fault suite."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = write_config(tmp)
    stage(["prepare_data", "--config", cfg, "--out", tmp / "data"], tmp)
    return cfg, tmp / "data"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_data, tmp_path_factory) -> Path:
    cfg, data = tiny_data
    tmp = cfg.parent
    out = tmp / "tokenizer" / "d2" / "model.pt"
    stage(["train_tokenizer", "--config", cfg, "--tokenizer", "d2", "--data", data / "train", "--out", out], tmp)
    return out


@pytest.fixture(scope="session")
def tiny_codes(tiny_data, tiny_tokenizer) -> Path:
    cfg, data = tiny_data
    tmp = cfg.parent
    out = tmp / "codes" / "d2" / "train"
    stage(["extract_codes", "--config", cfg, "--tokenizer", "d2", "--model", tiny_tokenizer,
           "--data", data / "train", "--out", out], tmp)
    return out
