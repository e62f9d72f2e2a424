"""Multi-process training (torchrun, gloo on the CPU) follows the single-process trajectory.

2 processes with the same global batch end with the same parameters as 1 process after N
steps, within float tolerance (DDP and FSDP reduce gradients in another order than a single
full-batch backward), with the model replicated (DDP) or sharded (FSDP), and a run
checkpointed by 1 process resumes on 2 and the other way round.
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dnd.checkpoint import load_checkpoint
from tests.stages import env, kill_when, stage, write_config

pytestmark = pytest.mark.slow
TOL = dict(rtol=1e-4, atol=1e-5)


def _torchrun(nproc: int, args: list, tmp) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dnd", *map(str, args)]
    r = subprocess.run(cmd, cwd=tmp, env=env(tmp), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def _close(a: dict, b: dict) -> None:
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def no_dropout(tiny_data, tiny_tokenizer, tiny_codes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    one = tmp / "one" / "model.pt"
    stage([*_train_args(tmp, tiny_data, tiny_codes, "ddp"), one], tmp)
    return tmp, tiny_data, tiny_codes, load_checkpoint(one)


def _train_args(tmp, tiny_data, tiny_codes, parallel: str) -> list:
    """train_generator on the tiny codes without dropout, 12 steps, every 4 checkpointed; ends with --out."""
    cfg = write_config(tmp, parallel, generators__g__overrides={"dropout": 0.0, "token_dropout": 0.0,
                                                                "class_dropout": 0.0},
                       generators__g__train__steps=12, generators__g__train__ckpt_every=4,
                       generators__g__train__parallel=parallel)
    _, data = tiny_data
    return ["train_generator", "--config", cfg, "--generator", "g", "--codes", tiny_codes, "--data", data / "train",
            "--out"]


def test_two_processes_equal_one(no_dropout):
    # Started the way the Snakemake rule starts it: `--processes 2` re-runs the stage under torchrun.
    tmp, data, codes, ref = no_dropout
    base = _train_args(tmp, data, codes, "ddp")
    out = tmp / "two" / "model.pt"
    log = stage([*base, out, "--processes", "2"], tmp).stderr
    assert "DDP over 2 processes" in log, log[-2000:]
    got = load_checkpoint(out)
    _close(got["model"], ref["model"])
    _close(got["ema"], ref["ema"])
    assert not (out.parent / "resume.pt").exists()


def test_fsdp_two_processes_equal_one(no_dropout):
    tmp, data, codes, ref = no_dropout
    out = tmp / "fsdp" / "model.pt"
    log = _torchrun(2, [*_train_args(tmp, data, codes, "fsdp"), out], tmp)
    held, total = (int(n.replace(",", "")) for n in re.search(r"([\d,]+) of ([\d,]+) parameters held", log).groups())
    assert held <= 0.55 * total, f"rank 0 holds {held} of {total} parameters: the model was not sharded"
    got = load_checkpoint(out)
    assert got["model"].keys() == ref["model"].keys()
    _close(got["model"], ref["model"])
    _close(got["ema"], ref["ema"])
    for name, state in ref["optimizer"]["state"].items():  # full AdamW moments, gathered from the shards
        _close(got["optimizer"]["state"][name], state)


def test_fsdp_run_resumes_on_one_process(no_dropout):
    # Killed while sharded over 2 processes, finished by 1 process in DDP mode (a plain run):
    # the checkpoint is full tensors keyed by name, and the parallel mode is not part of the resume key.
    tmp, data, codes, ref = no_dropout
    out = tmp / "fsdp-switch" / "model.pt"
    kill_when([*_train_args(tmp, data, codes, "fsdp"), out], tmp, lambda: (out.parent / "resume.pt").is_file(),
              nproc=2)
    assert not out.exists()
    r = stage([*_train_args(tmp, data, codes, "ddp"), out], tmp)
    assert "resuming" in r.stderr
    _close(load_checkpoint(out)["model"], ref["model"])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_with_other_process_count(no_dropout, parallel):
    # Killed as 1 process, finished by 2 (replicated or sharded: each takes its share of the full checkpoint).
    tmp, data, codes, ref = no_dropout
    out = tmp / f"switch-{parallel}" / "model.pt"
    kill_when([*_train_args(tmp, data, codes, "ddp"), out], tmp, lambda: (out.parent / "resume.pt").is_file())
    assert not out.exists()
    log = _torchrun(2, [*_train_args(tmp, data, codes, parallel), out], tmp)
    assert "resuming" in log
    got = load_checkpoint(out)
    _close(got["model"], ref["model"])
    _close(got["ema"], ref["ema"])


def test_tokenizer_two_processes_equal_one(tiny_data, tmp_path):
    # Dead-code restarts draw from rank 0's slice of the batch, so they are off here.
    _, data = tiny_data
    cfg = write_config(tmp_path, tokenizers__d2__quantizer={"depth": 2, "codebook_size": 64,
                                                            "restart_unused": False},
                       tokenizers__d2__train__steps=12)
    base = ["train_tokenizer", "--config", cfg, "--tokenizer", "d2", "--data", data / "train", "--out"]
    stage([*base, tmp_path / "one" / "model.pt"], tmp_path)
    _torchrun(2, [*base, tmp_path / "two" / "model.pt"], tmp_path)
    # Conv biases in front of GroupNorm have a zero true gradient, so Adam turns reduction-order
    # noise into lr-sized steps on them: compare what the models compute, not those weights.
    from dnd.data import load_split
    from dnd.images import to_tensor
    from dnd.tokenizer import load
    one, two = load(tmp_path / "one" / "model.pt"), load(tmp_path / "two" / "model.pt")
    torch.testing.assert_close(two.quantizer.embed, one.quantizer.embed, rtol=1e-3, atol=1e-4)
    x = to_tensor(np.array(load_split(data / "val").images))
    with torch.no_grad():
        rec_one, codes_one, _ = one(x)
        rec_two, codes_two, _ = two(x)
    torch.testing.assert_close(rec_two, rec_one, rtol=0, atol=2e-3)
    assert (codes_one == codes_two).float().mean() > 0.99
