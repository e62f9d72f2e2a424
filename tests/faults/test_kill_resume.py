"""kill -9 in the middle of a stage loses at most the work since the last checkpoint or shard.

Each test runs a stage uninterrupted (the reference), then runs it again in a fresh folder,
SIGKILLs it mid-way, checks that nothing that looks like a finished output exists, runs it
once more, and compares the final artifacts with the reference bit for bit (the CPU runs
are deterministic: same seed, same data order, one thread).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from dnd.checkpoint import load_checkpoint
from tests.stages import kill_when, stage, write_config

pytestmark = pytest.mark.slow


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs after resume"


def _no_outputs(folder, names):
    left = [n for n in names if (folder / n).exists()]
    assert not left, f"a killed stage left outputs that look complete: {left}"


def test_kill_tokenizer_training(tiny_data, tiny_tokenizer, tmp_path):
    cfg, data = tiny_data
    out = tmp_path / "tokenizer" / "d2" / "model.pt"
    args = ["train_tokenizer", "--config", cfg, "--tokenizer", "d2", "--data", data / "train", "--out", out]
    resume = out.parent / "resume.pt"
    kill_when(args, tmp_path, lambda: resume.is_file())
    _no_outputs(out.parent, ["model.pt"])
    assert load_checkpoint(resume)["step"] >= 10
    r = stage(args, tmp_path)
    assert "resuming" in r.stdout + r.stderr
    _same_state(load_checkpoint(out)["model"], load_checkpoint(tiny_tokenizer)["model"])
    assert not resume.exists()


def test_kill_generator_training(tiny_data, tiny_tokenizer, tiny_codes, tmp_path):
    cfg, data = tiny_data
    ref = tmp_path / "ref" / "model.pt"
    base = ["train_generator", "--config", cfg, "--generator", "g", "--codes", tiny_codes,
            "--data", data / "train", "--tokenizer-model", tiny_tokenizer, "--out"]
    stage([*base, ref], tmp_path)
    out = tmp_path / "killed" / "model.pt"
    resume = out.parent / "resume.pt"
    kill_when([*base, out], tmp_path, lambda: resume.is_file())
    _no_outputs(out.parent, ["model.pt"])
    stage([*base, out], tmp_path)
    a, b = load_checkpoint(out), load_checkpoint(ref)
    _same_state(a["model"], b["model"])
    _same_state(a["ema"], b["ema"])
    assert (out.parent / "losses.csv").read_text() == (ref.parent / "losses.csv").read_text()


def test_kill_code_extraction(tiny_data, tiny_tokenizer, tiny_codes, tmp_path):
    cfg, data = tiny_data
    out = tmp_path / "codes"
    # 12 shards of 8 (the same batches as the reference's 6 shards of 16), so that most of the
    # work is still left when the second shard appears.
    cfg = write_config(tmp_path, extract__shard_size=8)
    args = ["extract_codes", "--config", cfg, "--tokenizer", "d2", "--model", tiny_tokenizer,
            "--data", data / "train", "--out", out]
    kill_when(args, tmp_path, lambda: len(list((out / "shards").glob("0*.npy"))) >= 2)
    _no_outputs(out, ["codes.npy", "labels.npy", "manifest.json"])
    stage(args, tmp_path)
    assert np.array_equal(np.load(out / "codes.npy"), np.load(tiny_codes / "codes.npy"))
    assert np.array_equal(np.load(out / "labels.npy"), np.load(tiny_codes / "labels.npy"))


def test_kill_sampling(tiny_data, tiny_tokenizer, tiny_codes, tmp_path):
    cfg, data = tiny_data
    gen = tmp_path / "gen" / "model.pt"
    stage(["train_generator", "--config", cfg, "--generator", "g", "--codes", tiny_codes,
           "--data", data / "train", "--out", gen], tmp_path)
    base = ["sample", "--config", cfg, "--generator", "g", "--sampler", "s", "--model", gen,
            "--tokenizer-model", tiny_tokenizer, "--out"]
    ref = tmp_path / "ref"
    stage([*base, ref], tmp_path)
    out = tmp_path / "killed"
    kill_when([*base, out], tmp_path, lambda: len(list((out / "batches").glob("*.npz"))) >= 2)
    _no_outputs(out, ["codes.npy", "images.npy", "timing.json"])
    r = stage([*base, out], tmp_path)
    assert "resuming" in r.stdout + r.stderr
    for name in ("codes.npy", "labels.npy", "images.npy"):
        assert np.array_equal(np.load(out / name), np.load(ref / name)), name
    shutil.rmtree(tmp_path / "gen")
