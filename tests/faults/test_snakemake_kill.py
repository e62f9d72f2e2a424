"""Snakemake itself killed mid-run (the whole process group): `make run` again recovers.

`make run` releases the lock a SIGKILLed Snakemake leaves behind, and the local profile's
`rerun-incomplete` redoes the job that was running (its stage resumes from `resume.pt`),
with no manual clean-up.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.stages import ROOT, env, write_config

pytestmark = pytest.mark.slow
TARGET = "results/tiny/samples/g/s/images.npy"


def _make_run(workdir) -> list[str]:
    return ["make", "-C", str(ROOT), "run", "EXP=tiny", f"WORKDIR={workdir}", f"TARGETS={TARGET}"]


def test_killed_snakemake_recovers_on_make_run(tmp_path):
    (tmp_path / "experiments").mkdir()
    write_config(tmp_path / "experiments", name="tiny")
    resume = tmp_path / "results" / "tiny" / "tokenizer" / "d2" / "resume.pt"
    p = subprocess.Popen(_make_run(tmp_path), env=env(tmp_path), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not resume.exists():
        assert p.poll() is None, "make run ended before it could be killed"
        assert time.time() < deadline, "tokenizer training never checkpointed"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "results/tiny/tokenizer/d2/model.pt").exists()
    assert list((tmp_path / ".snakemake" / "locks").iterdir()), "expected the killed run to leave its lock"

    r = subprocess.run(_make_run(tmp_path), env=env(tmp_path), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    log = (tmp_path / "results/tiny/logs/train_tokenizer/d2.log").read_text()
    assert "resuming from" in log, log[-2000:]
    images = np.load(tmp_path / TARGET)
    assert images.dtype == np.uint8 and images.shape[0] == 24
    again = subprocess.run([*_make_run(tmp_path), "TARGETS=-n " + TARGET], env=env(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
