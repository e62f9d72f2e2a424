"""Every experiment YAML validates, and Snakemake plans each one's DAG (`snakemake -n`).

The paper configs name data on a cluster (ImageNet, a Wikipedia dump) that the config
check requires to exist, so the tests run them on a copy whose data paths point at
empty stand-ins in a temporary folder; nothing else in the copy changes.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dnd.config import ConfigError, code_depth, load
from tests.stages import expected_jobs

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# Config keys that name data which must exist on the machine that runs the experiment.
DATA_PATH_KEYS = [("data", "image_folder", "root"), ("data", "text", "corpus")]


def localised(name: str, workdir: Path) -> Path:
    """Copy experiments/<name>.yaml into workdir/experiments/, with missing data paths replaced by stand-ins."""
    raw = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())
    for keys in DATA_PATH_KEYS:
        node = raw
        for k in keys[:-1]:
            node = node.get(k) or {}
        path = node.get(keys[-1])
        if path and not Path(path).exists():
            stand_in = workdir / "data" / name / keys[-2]
            if keys[-1] == "root":
                (stand_in / "n01440764").mkdir(parents=True, exist_ok=True)
            else:
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                stand_in.write_text("A paragraph of stand-in text for the config check.\n")
            node[keys[-1]] = str(stand_in)
    out = workdir / "experiments" / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def test_the_documented_experiments_exist():
    assert {"smoke", "text-small", "natural-small", "imagenet256-paper", "textimage-paper"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_validates(name, tmp_path):
    try:
        load(ROOT / "experiments" / f"{name}.yaml")
    except ConfigError as e:  # only the data paths of cluster configs may be absent here
        assert re.search(r"data\.(image_folder\.root|text\.corpus): .* does not exist", str(e)), str(e)
    cfg = load(localised(name, tmp_path))
    assert cfg["name"] == name
    assert cfg["description"], f"{name}: the report shows the description; write one"
    used = {g["tokenizer"] for g in cfg["generators"].values()}
    assert used <= set(cfg["tokenizers"])
    assert cfg["generators"] and cfg["samplers"], f"{name}: nothing to compare"


def test_smoke_is_small_enough_for_two_cpu_cores():
    cfg = load(ROOT / "experiments/smoke.yaml")
    assert cfg["data"]["image_size"] == 64 and cfg["data"]["text"]["font_size"] == 12
    assert sorted(t["quantizer"]["depth"] for t in cfg["tokenizers"].values()) == [1, 4]
    assert {g["kind"] for g in cfg["generators"].values()} == {"dnd", "ar1d", "rqt"}
    assert cfg["resources"]["gpu"] == 0
    # Tokenizers: bounded by images seen (a cheap-stem step of 16 images costs ~0.15 s on one core).
    assert all(t["stem_stride"] == 2 for t in cfg["tokenizers"].values()), "keep the smoke tokenizers' stem cheap"
    assert all(t["train"]["steps"] * t["train"]["batch_size"] <= 16000 for t in cfg["tokenizers"].values())
    assert all(g["train"]["steps"] <= 600 and g["size"] in ("tiny", "small") for g in cfg["generators"].values())


def test_paper_settings_match_the_published_recipe():
    raw = {n: yaml.safe_load((ROOT / "experiments" / f"{n}.yaml").read_text())
           for n in ("imagenet256-paper", "textimage-paper")}
    imagenet = raw["imagenet256-paper"]
    assert imagenet["data"]["image_size"] == 256
    for tok in imagenet["tokenizers"].values():
        assert tok["quantizer"]["codebook_size"] == 16384 and tok["quantizer"]["shared_codebook"]
        assert 256 // 2 ** (len(tok["ch_mult"]) - 1) == 16  # f = 16
    dnd = imagenet["generators"]["dnd-XXL-d2"]
    assert dnd["size"] == "XXL" and dnd["head_layers"] == [39, 47]
    assert dnd["train"]["ema_decay"] == 0.9999 and dnd["train"]["betas"] == [0.9, 0.95]
    assert imagenet["samplers"]["cfg2.0"]["cfg_scale"] == 2.0
    assert imagenet["samplers"]["cfg2.0"]["num_samples"] == 50000
    text = raw["textimage-paper"]
    page = text["data"]["text"]
    assert (text["data"]["image_size"], page["font_size"], page["margin"], page["max_words"]) == (512, 32, 20, 100)
    assert text["generators"]["dnd-XXL-d8"]["head_layers"] == list(range(26, 48, 3))
    assert {s["temperature"] for s in text["samplers"].values()} == {0.1, 0.5, 1.0}


def dry_run(workdir: Path, experiments: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "-n", "-p", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
         "--config", f"experiments=[{','.join(experiments)}]", *extra],
        capture_output=True, text=True, timeout=300)


def job_counts(stdout: str) -> dict[str, int]:
    table = stdout.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_dry_run_plans_every_experiment(tmp_path):
    cfgs = {name: load(localised(name, tmp_path)) for name in EXPERIMENTS}
    proc = dry_run(tmp_path, EXPERIMENTS)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    counts = job_counts(proc.stdout)
    expected = {}
    for cfg in cfgs.values():
        for rule, n in expected_jobs(cfg).items():
            expected[rule] = expected.get(rule, 0) + n
    assert {k: v for k, v in counts.items() if k not in ("all", "total")} == expected
    # every job declares a log, a benchmark file and its resources
    jobs = [block for block in proc.stdout.split("\nrule ") if "jobid:" in block]
    for block in jobs:
        if block.lstrip().startswith("all:"):
            continue
        assert "    log: results/" in block and "    benchmark: results/" in block, block
        assert re.search(r"resources: .*mem_mb=\d+.*", block) and "runtime=" in block and "gpu=" in block, block
    # GPU-sized experiments ask for the GPU, and train on 8 of them under torchrun; the smoke run does not
    assert re.search(r"wildcards: exp=imagenet256-paper, gen=dnd-XXL-d2\n\s+resources: .*gpu=8", proc.stdout)
    assert re.search(r"wildcards: exp=imagenet256-paper, gen=dnd-XXL-d2, sampler=cfg2.0\n\s+resources: .*gpu=1",
                     proc.stdout)
    assert re.search(r"-m dnd train_generator --config \S+imagenet256-paper.yaml --generator dnd-XXL-d2 .* "
                     r"--processes 8 ", proc.stdout)
    assert re.search(r"wildcards: exp=smoke, gen=dnd\n\s+resources: .*gpu=0", proc.stdout)
    assert re.search(r"OMP_NUM_THREADS=1 \S+python\S* -m dnd train_generator --config \S+smoke.yaml .* "
                     r"--processes 0 ", proc.stdout)


def test_experiments_may_be_given_as_a_comma_separated_string(tmp_path):
    localised("smoke", tmp_path)
    proc = subprocess.run([*SNAKEMAKE, "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                           "--config", "experiments=smoke,"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_counts(proc.stdout)["report"] == 1


def test_bad_experiment_fails_before_any_job(tmp_path):
    path = localised("smoke", tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["generators"]["tokenizer"] = raw["generators"]["dnd"]
    path.write_text(yaml.safe_dump(raw))
    proc = dry_run(tmp_path, ["smoke"])
    assert proc.returncode != 0
    assert "generators.tokenizer: this name is reserved" in proc.stderr + proc.stdout
    raw["generators"].pop("tokenizer")
    raw["data"]["image_size"] = 60
    path.write_text(yaml.safe_dump(raw))
    proc = dry_run(tmp_path, ["smoke"])
    assert proc.returncode != 0
    assert "not divisible by the downsampling factor" in proc.stderr + proc.stdout


def test_smoke_generator_depths_are_the_documented_ones():
    cfg = load(ROOT / "experiments/smoke.yaml")
    assert {n: code_depth(cfg, g) for n, g in cfg["generators"].items()} == {"dnd": 4, "ar1d": 1, "rqt": 4}
