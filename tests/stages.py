"""Run CLI stages in subprocesses on a tiny experiment (the way Snakemake runs them).

Shared by the fault suite (tests/faults/) and the multi-process training test.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 3,
    "device": "cpu",
    "data": {"source": "text", "image_size": 32, "num_train": 96, "num_val": 16,
             "text": {"font_size": 12, "margin": 2, "max_words": 6}},
    "tokenizers": {"d2": {"quantizer": {"depth": 2, "codebook_size": 64}, "embed_dim": 8, "ch": 8,
                          "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 8,
                          "train": {"steps": 60, "batch_size": 8, "warmup_steps": 5, "ckpt_every": 10,
                                    "log_every": 10}}},
    "extract": {"batch_size": 8, "shard_size": 16},
    "generators": {"g": {"kind": "dnd", "tokenizer": "d2", "size": "tiny",
                         "train": {"steps": 60, "batch_size": 8, "warmup_steps": 5, "ckpt_every": 10,
                                   "log_every": 10}}},
    "samplers": {"s": {"temperature": 1.0, "num_samples": 24, "batch_size": 4, "seed": 1}},
}


def env(tmp: Path, **extra) -> dict:
    e = dict(os.environ)
    e.update({"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
              "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    e.update(extra)
    return e


def write_config(tmp: Path, name: str = "tiny", **changes) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    for dotted, value in changes.items():
        node = cfg
        *keys, last = dotted.split("__")
        for k in keys:
            node = node[k]
        node[last] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stage(args: list[str], tmp: Path, *, check: bool = True, **env_extra) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dnd", *map(str, args)], cwd=tmp, env=env(tmp, **env_extra),
                       capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"dnd {args[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def kill_when(args: list[str], tmp: Path, ready, *, timeout: float = 300, nproc: int = 0) -> None:
    """Start a stage (under torchrun with `nproc` processes if > 0), SIGKILL its whole process
    group as soon as `ready()` is true."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    p = subprocess.Popen([sys.executable, *launcher, "-m", "dnd", *map(str, args)], cwd=tmp, env=env(tmp),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            if p.poll() is not None:
                raise AssertionError(f"stage ended before the fault could be injected:\n{p.stderr.read()[-2000:]}")
            if time.time() > deadline:
                raise AssertionError("timed out waiting to inject the fault")
            time.sleep(0.01)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL, f"the stage was not killed (exit {p.returncode})"


def expected_jobs(cfg: dict) -> Counter:
    """The jobs per rule that the pipeline runs for a validated experiment config."""
    n_tok, n_gen, n_samp = len(cfg["tokenizers"]), len(cfg["generators"]), len(cfg["samplers"])
    return Counter({"prepare_data": 1, "reference_stats": 2, "train_tokenizer": n_tok, "reconstruct": n_tok,
                    "evaluate_tokenizer": n_tok,
                    "extract_codes": 2 * len({g["tokenizer"] for g in cfg["generators"].values()}),  # train, val
                    "train_generator": n_gen, "heldout_loss": n_gen, "sample": n_gen * n_samp,
                    "evaluate_samples": n_gen * n_samp, "evaluate_reference": 1, "depth_cost": 1, "report": 1})
