"""End to end: the smoke experiment through `snakemake --cores 2` in a temporary folder.

One run (about 10-15 minutes on 2 CPU cores) feeds every test here: the outputs of
every stage exist, MLflow holds one FINISHED run per job with its tags, the report has
a row per generator, a second invocation has nothing to do, and a changed generator
parameter re-runs exactly that generator's downstream jobs.
"""
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from dnd.config import load
from tests.stages import expected_jobs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXP = "smoke"
TIMEOUT_S = 30 * 60


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store, results/mlflow.db in the work folder
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
         "--config", f"experiments=[{EXP}]", *args],
        capture_output=True, text=True, timeout=timeout, env=env)


def planned_jobs(stdout: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job in a dry run's output."""
    jobs = []
    for block in stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0].strip()
        m = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        wildcards = dict(kv.split("=", 1) for kv in m.group(1).split(", ")) if m else {}
        jobs.append((rule, wildcards))
    return jobs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    (workdir / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / f"{EXP}.yaml", workdir / "experiments")
    proc = snakemake(workdir, "--cores", "2", timeout=TIMEOUT_S)
    if proc.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-2000:]}" for p in sorted(workdir.glob("results/*/logs/**/*.log")))
        pytest.fail(f"snakemake failed:\n{proc.stderr[-4000:]}\n{logs[-8000:]}")
    return workdir, load(workdir / "experiments" / f"{EXP}.yaml")


def test_every_stage_wrote_its_outputs(run):
    workdir, cfg = run
    r = workdir / "results" / EXP
    expected = [f"data/{s}/{f}" for s in ("train", "val") for f in ("images.npy", "labels.npy", "manifest.json",
                                                                     "text.jsonl", "fid_features.npz")]
    expected += ["metrics/reference.json", "metrics/depth_cost.json"]
    for tok in cfg["tokenizers"]:
        expected += [f"tokenizer/{tok}/model.pt", f"tokenizer/{tok}/train_log.csv",
                     f"tokenizer/{tok}/recon/recon_metrics.json", f"metrics/tokenizer/{tok}.json"]
    for tok in {g["tokenizer"] for g in cfg["generators"].values()}:
        expected += [f"codes/{tok}/{s}/{f}" for s in ("train", "val") for f in ("codes.npy", "labels.npy",
                                                                               "manifest.json")]
    for gen in cfg["generators"]:
        expected += [f"generators/{gen}/model.pt", f"generators/{gen}/losses.csv", f"metrics/heldout/{gen}.json"]
        for sampler in cfg["samplers"]:
            expected += [f"samples/{gen}/{sampler}/{f}" for f in ("codes.npy", "labels.npy", "images.npy",
                                                                  "grid.png", "timing.json")]
            expected += [f"metrics/{gen}/{sampler}.json"]
    missing = [p for p in expected if not (r / p).is_file()]
    assert not missing, missing
    # temp(): the reconstructions are gone once the tokenizer metrics are written
    assert not list(r.glob("tokenizer/*/recon/recon.npy"))
    for name in ("report.html", "report.pdf", "figures/depth.png", "figures/stage_cost.png"):
        assert (workdir / "reports" / EXP / name).is_file(), name
    # one benchmark file and one log per job
    jobs = sum(expected_jobs(cfg).values())
    assert len(list(r.glob("benchmarks/**/*.tsv"))) == jobs
    assert len(list(r.glob("logs/**/*.log"))) == jobs


def test_mlflow_has_one_finished_run_per_job(run):
    from mlflow.tracking import MlflowClient

    workdir, cfg = run
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/results/mlflow.db")
    experiment = client.get_experiment_by_name(EXP)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert Counter(r.data.tags.get("rule") for r in runs) == expected_jobs(cfg)
    for r in runs:
        assert r.info.status == "FINISHED", (r.data.tags.get("rule"), r.info.status)
        for tag in ("stage", "variant", "config_hash", "git_commit", "rule"):
            assert tag in r.data.tags, (r.data.tags.get("rule"), tag)
    trained = {r.data.tags["variant"] for r in runs if r.data.tags["rule"] == "train_generator"}
    assert trained == set(cfg["generators"])


def test_report_has_a_row_per_generator(run):
    workdir, cfg = run
    html = (workdir / "reports" / EXP / "report.html").read_text()
    body = re.search(r'<table id="generators">(.*?)</table>', html, re.S).group(1)
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]
    ours = [row for row in rows if row and row[0] == "this run"]
    assert sorted(row[1] for row in ours) == sorted(cfg["generators"])
    header = re.findall(r"<th>(.*?)</th>", body)
    fids = [float(row[header.index("FID")]) for row in ours]
    assert all(f > 0 for f in fids)
    assert "Missing inputs" not in html


def test_second_invocation_has_nothing_to_do(run):
    workdir, _ = run
    proc = snakemake(workdir, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_snakemake_report_collects_the_figures(run):
    workdir, _ = run
    proc = snakemake(workdir, "--report", str(workdir / "snakemake_report.zip"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "snakemake_report.zip").stat().st_size > 10_000


def planned_after(workdir: Path, edit) -> list[tuple[str, dict]]:
    """The jobs a dry run plans after `edit(raw config)`; the experiment file is restored afterwards."""
    exp_file = workdir / "experiments" / f"{EXP}.yaml"
    original = exp_file.read_text()
    raw = yaml.safe_load(original)
    edit(raw)
    exp_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        proc = snakemake(workdir, "-n")
    finally:
        exp_file.write_text(original)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(rule, w) for rule, w in planned_jobs(proc.stdout) if rule != "all"]


def test_changed_generator_parameter_reruns_only_its_jobs(run):
    workdir, cfg = run
    gen = "rqt"

    def more_steps(raw):
        train = raw["generators"][gen]["train"]  # a YAML alias shared with the other generators: copy it
        raw["generators"][gen]["train"] = {**train, "steps": train.get("steps", 300) + 10}

    got = sorted((rule, w.get("gen", "")) for rule, w in planned_after(workdir, more_steps))
    want = sorted([("train_generator", gen), ("heldout_loss", gen), ("report", "")]
                  + [(rule, gen) for rule in ("sample", "evaluate_samples") for _ in cfg["samplers"]])
    assert got == want, got


def test_execution_only_settings_rerun_nothing_but_the_report(run):
    # How a training executes (parallel mode, compile, checkpoint cadence) does not change its weights.
    def execute_otherwise(raw):
        for gen in raw["generators"].values():
            gen["train"] = {**gen["train"], "parallel": "fsdp", "ckpt_every": 7, "log_every": 3}

    assert [rule for rule, _ in planned_after(run[0], execute_otherwise)] == ["report"]
