"""The pipeline on a real (single-node) SLURM cluster through the SLURM profile.

`workflow/slurm/local_cluster.sh` brings up Debian's slurmctld + slurmd + munge on this
machine; a tiny experiment's chain (data -> tokenizer -> codes -> generator -> samples)
then runs with `--profile workflow/profiles/slurm`. The test checks that every job went
through sbatch (job ids in Snakemake's log and in `squeue --states=all`) and that the
results equal a local run's bit for bit. The cluster is torn down at the end.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.stages import ROOT, env, write_config

pytestmark = pytest.mark.slow
CLUSTER = ROOT / "workflow" / "slurm" / "local_cluster.sh"
TARGETS = ["results/tiny/samples/g/s/images.npy", "results/tiny/samples/g/s/codes.npy"]


def _snakemake(workdir, *extra, timeout=1200):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--config", "experiments=[tiny]", *extra, *TARGETS]
    return subprocess.run(["timeout", str(timeout), *cmd], capture_output=True, text=True, env=env(workdir),
                          cwd=workdir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm-state")
    # The one accepted skip (issue 6): a machine where Debian's Slurm packages cannot be
    # installed has no scheduler to test against. Any other bring-up failure fails the test.
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no Slurm to test against: slurmctld is not installed and there is no apt-get to install "
                    "slurmctld slurmd slurm-client munge")
    up = subprocess.run(["timeout", "900", "bash", str(CLUSTER), "up", str(state)], capture_output=True, text=True)
    if up.returncode == 3:
        pytest.skip(f"no Slurm to test against: apt-get could not install slurmctld slurmd slurm-client munge "
                    f"({up.stderr.strip()})")
    assert up.returncode == 0, up.stdout + up.stderr
    yield state
    subprocess.run(["timeout", "60", "bash", str(CLUSTER), "down", str(state)], capture_output=True, text=True)


def _workdir(tmp_path, name):
    wd = tmp_path / name
    (wd / "experiments").mkdir(parents=True)
    write_config(wd / "experiments", name="tiny")
    return wd


def test_pipeline_runs_through_sbatch_and_matches_local(cluster, tmp_path):
    local = _workdir(tmp_path, "local")
    r = _snakemake(local, "--cores", "2")
    assert r.returncode == 0, r.stderr[-4000:]

    remote = _workdir(tmp_path, "slurm")
    r = _snakemake(remote, "--profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--slurm-no-account",
                   "--default-resources", "slurm_partition=debug", "--jobs", "2")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]

    job_ids = set(re.findall(r"SLURM jobid (\d+)", log)) | set(re.findall(r"external jobid '?(\d+)", log))
    assert len(job_ids) >= 5, f"expected one SLURM job per rule, found {sorted(job_ids)} in:\n{log[-3000:]}"
    queue = subprocess.run(["timeout", "30", "squeue", "--states=all", "-h", "-o", "%i %j %T"],
                           capture_output=True, text=True).stdout
    seen = {line.split()[0] for line in queue.splitlines() if line.strip()}
    assert job_ids <= seen, f"jobs {sorted(job_ids - seen)} not known to the controller:\n{queue}"

    for target in TARGETS:
        assert np.array_equal(np.load(local / target), np.load(remote / target)), target
