# Experiments, their validated configs, and the targets derived from their variants.
#
# Which experiments run: `--config experiments=[smoke,text-small]` (or a comma-separated
# string); default: smoke. Each one is `<experiment_dir>/<name>.yaml` (experiment_dir
# defaults to `experiments`, relative to the working directory), loaded and validated
# by `dnd.config.load`, the same function every `python -m dnd` stage uses, so a bad
# config fails here, before any job runs.
import os
import re
import sys
from pathlib import Path

# The rules and the `dnd` package they call come from the same checkout, installed or
# not: this process imports it from here, and so do the jobs (they inherit PYTHONPATH).
REPO = Path(workflow.basedir).resolve()
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from dnd.config import ConfigError, config_hash, depth_cost_plan, generator_trajectory, load  # noqa: E402

# Jobs run `python -m dnd` with the interpreter running Snakemake, so an un-activated
# virtualenv works.
PYTHON = sys.executable
EXPERIMENT_DIR = Path(config.get("experiment_dir", "experiments"))
RESERVED_GENERATOR_NAMES = {"tokenizer"}  # metrics/tokenizer/ holds the tokenizer metrics


def _experiment_names() -> list[str]:
    names = config.get("experiments", ["smoke"])
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    if not names:
        raise ValueError("config 'experiments' is empty; name at least one file stem of experiments/*.yaml")
    return list(names)


def _load_experiments() -> dict[str, dict]:
    cfgs = {}
    for name in _experiment_names():
        path = EXPERIMENT_DIR / f"{name}.yaml"
        try:
            cfg = load(path)
        except ConfigError as e:
            raise ValueError(f"experiment {name!r}: {e}") from None
        clash = RESERVED_GENERATOR_NAMES & set(cfg["generators"])
        if clash:
            raise ValueError(f"{path}: generators.{sorted(clash)[0]}: this name is reserved "
                             f"(results/{name}/metrics/tokenizer/ holds the tokenizer metrics)")
        cfgs[name] = cfg
    return cfgs


EXPERIMENTS = _load_experiments()


def _alternatives(names) -> str:
    names = sorted(set(names))
    return "|".join(re.escape(n) for n in names) if names else "(?!)"  # (?!) never matches


wildcard_constraints:
    exp=_alternatives(EXPERIMENTS),
    tok=_alternatives(t for c in EXPERIMENTS.values() for t in c["tokenizers"]),
    gen=_alternatives(g for c in EXPERIMENTS.values() for g in c["generators"]),
    sampler=_alternatives(s for c in EXPERIMENTS.values() for s in c["samplers"]),
    split="train|val",


# ---- config lookups (wildcards -> values) ------------------------------------------


def exp_cfg(wildcards) -> dict:
    return EXPERIMENTS[wildcards.exp]


def exp_file(wildcards) -> str:
    return str(EXPERIMENT_DIR / f"{wildcards.exp}.yaml")


def generator_tokenizer(wildcards) -> str:
    return exp_cfg(wildcards)["generators"][wildcards.gen]["tokenizer"]


# Each rule's params carry the hash of exactly the config it reads, so a changed value
# re-runs that rule (Snakemake's `params` rerun trigger) and, through its outputs, only
# the jobs downstream of it.
def hash_of(select):
    return lambda wildcards: config_hash(select(exp_cfg(wildcards), wildcards))


# ---- resources --------------------------------------------------------------------
# From the experiment's `resources` block. GPUs are a custom resource (`gpu`), so a
# profile's `--resources gpu=N` keeps parallel jobs off an occupied device; rules that
# never touch a model ask for none. SLURM partition/account are dropped when null.


def res_threads(wildcards) -> int:
    return exp_cfg(wildcards)["resources"]["threads"]


def train_gpus(wildcards) -> int:
    """GPUs of a training job; its stage runs one process per GPU (`--processes {resources.gpu}`)."""
    res = exp_cfg(wildcards)["resources"]
    return res["gpu"] if res["train_gpus"] is None else res["train_gpus"]


def job_resources(*, uses_gpu: bool = True, trains: bool = False, mem_mb: int | None = None,
                  runtime: int | None = None) -> dict:
    def pick(key):
        return lambda wildcards: exp_cfg(wildcards)["resources"][key]

    return {
        "mem_mb": mem_mb or pick("mem_mb"),
        "runtime": runtime or pick("runtime_min"),  # minutes
        "gpu": train_gpus if trains else pick("gpu") if uses_gpu else 0,
        "slurm_partition": pick("slurm_partition"),
        "slurm_account": pick("slurm_account"),
    }


MODEL_JOB = job_resources()
TRAIN_JOB = job_resources(trains=True)
DATA_JOB = job_resources(uses_gpu=False)
REPORT_JOB = job_resources(uses_gpu=False, mem_mb=4000, runtime=30)


# ---- paths ------------------------------------------------------------------------

RESULTS = "results/{exp}"
SPLIT_FILES = ["images.npy", "labels.npy", "manifest.json"]


def data_files(split: str) -> list[str]:
    return [f"{RESULTS}/data/{split}/{f}" for f in SPLIT_FILES]


def tokenizer_model(wildcards) -> str:
    return f"results/{wildcards.exp}/tokenizer/{generator_tokenizer(wildcards)}/model.pt"


def log_path(rule_name: str, variant: str = "all") -> str:
    return f"{RESULTS}/logs/{rule_name}/{variant}.log"


def benchmark_path(rule_name: str, variant: str = "all") -> str:
    # The report reads these: rule = folder, variant = the rest of the path.
    return f"{RESULTS}/benchmarks/{rule_name}/{variant}.tsv"


# ---- targets ----------------------------------------------------------------------


def report_inputs(wildcards) -> dict[str, list[str]]:
    """Everything the report reads, so that it re-runs when any of it changes."""
    cfg, r = exp_cfg(wildcards), f"results/{wildcards.exp}"
    gens, toks, samplers = cfg["generators"], cfg["tokenizers"], cfg["samplers"]
    return {
        "manifests": [f"{r}/data/{s}/manifest.json" for s in ("train", "val")],
        "reference": [f"{r}/metrics/reference.json"],
        "tokenizer_metrics": [f"{r}/metrics/tokenizer/{t}.json" for t in toks],
        "tokenizer_logs": [f"{r}/tokenizer/{t}/train_log.csv" for t in toks],
        "generator_metrics": [f"{r}/metrics/{g}/{s}.json" for g in gens for s in samplers],
        "losses": [f"{r}/generators/{g}/losses.csv" for g in gens],
        "heldout": [f"{r}/metrics/heldout/{g}.json" for g in gens],
        "grids": [f"{r}/samples/{g}/{s}/grid.png" for g in gens for s in samplers],
        "timings": [f"{r}/samples/{g}/{s}/timing.json" for g in gens for s in samplers],
        "depth_cost": [f"{r}/metrics/depth_cost.json"],
    }


# The figures dnd.report.render_report writes (reports/{exp}/figures/<name>.png); a test
# keeps this list equal to dnd.report.render.FIGURE_CAPTIONS.
REPORT_FIGURES = ["depth", "generators", "speed", "losses", "stage_cost"]


def final_outputs() -> list[str]:
    return [f"reports/{exp}/report.{ext}" for exp in EXPERIMENTS for ext in ("html", "pdf")]
