"""Multi-process training (torchrun, gloo on the CPU) follows the single-process trajectory.

2 processes with the same global batch end with the same parameters as 1 process after N
steps, within float tolerance (DDP averages gradients in another reduction order than a
single full-batch backward), and a run checkpointed by 1 process resumes on 2.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dnd.checkpoint import load_checkpoint
from tests.stages import env, kill_when, stage, write_config

pytestmark = pytest.mark.slow
TOL = dict(rtol=1e-4, atol=1e-5)


def _torchrun(nproc: int, args: list, tmp) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dnd", *map(str, args)]
    r = subprocess.run(cmd, cwd=tmp, env=env(tmp), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _close(a: dict, b: dict) -> None:
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def no_dropout(tiny_data, tiny_tokenizer, tiny_codes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = write_config(tmp, generators__g__overrides={"dropout": 0.0, "token_dropout": 0.0, "class_dropout": 0.0},
                       generators__g__train__steps=12, generators__g__train__ckpt_every=4)
    _, data = tiny_data
    base = ["train_generator", "--config", cfg, "--generator", "g", "--codes", tiny_codes, "--data", data / "train",
            "--out"]
    one = tmp / "one" / "model.pt"
    stage([*base, one], tmp)
    return tmp, base, load_checkpoint(one)


def test_two_processes_equal_one(no_dropout):
    tmp, base, ref = no_dropout
    out = tmp / "two" / "model.pt"
    _torchrun(2, [*base, out], tmp)
    got = load_checkpoint(out)
    _close(got["model"], ref["model"])
    _close(got["ema"], ref["ema"])
    assert not (out.parent / "resume.pt").exists()


def test_resume_with_other_process_count(no_dropout):
    tmp, base, ref = no_dropout
    out = tmp / "switch" / "model.pt"
    kill_when([*base, out], tmp, lambda: (out.parent / "resume.pt").is_file())
    assert not out.exists()
    _torchrun(2, [*base, out], tmp)
    _close(load_checkpoint(out)["model"], ref["model"])
