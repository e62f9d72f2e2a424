"""Collect an experiment's results into pandas tables, beside the published rows.

Every reader is defensive: the report shows what exists. A missing or unreadable file
becomes empty cells plus an entry in `Results.missing`, never an exception, so a
report can be rendered from a partial run (and tells which files it lacked).
"""
from __future__ import annotations

import csv
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from dnd.config import code_depth, downsample_factor

PUBLISHED_PATH = Path(__file__).resolve().parent / "published.yaml"
PUBLISHED = "published"
# Snakemake rules in the order data flows through them (the stage-cost table follows it).
STAGE_ORDER = ["prepare_data", "reference_stats", "train_tokenizer", "reconstruct", "evaluate_tokenizer",
               "extract_codes", "train_generator", "heldout_loss", "sample", "evaluate_samples", "evaluate_reference",
               "depth_cost", "report"]


@dataclass
class Results:
    """Everything the report shows about one experiment (tables are pandas DataFrames)."""

    data: pd.DataFrame
    tokenizers: pd.DataFrame
    generators: pd.DataFrame
    comparison: pd.DataFrame
    speed: pd.DataFrame
    reference: dict
    losses: dict[str, pd.DataFrame]
    heldout: pd.DataFrame
    depth_cost: pd.DataFrame
    depth_cost_plan: dict
    grids: dict[tuple[str, str], Path]
    stage_cost: pd.DataFrame
    extractors: list[str]
    missing: list[str] = field(default_factory=list)


class _Reader:
    """Reads result files, recording the ones that are missing or unreadable."""

    def __init__(self, results_dir: Path):
        self.root = Path(results_dir)
        self.missing: list[str] = []

    def _note(self, path: Path, why: str) -> None:
        try:
            shown = path.relative_to(self.root)
        except ValueError:
            shown = path
        self.missing.append(f"{shown} ({why})")

    def json(self, rel: str) -> dict | None:
        path = self.root / rel
        if not path.is_file():
            self._note(path, "missing")
            return None
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            self._note(path, f"unreadable: {e}")
            return None
        if not isinstance(value, dict):
            self._note(path, "not a JSON object")
            return None
        return value

    def csv(self, rel: str) -> pd.DataFrame | None:
        path = self.root / rel
        if not path.is_file():
            self._note(path, "missing")
            return None
        try:
            return pd.read_csv(path)
        except (OSError, ValueError) as e:
            self._note(path, f"unreadable: {e}")
            return None

    def file(self, rel: str) -> Path | None:
        path = self.root / rel
        if not path.is_file():
            self._note(path, "missing")
            return None
        return path


def _num(value) -> float:
    """A metric as float; None, strings and non-finite values become NaN."""
    if isinstance(value, bool) or value is None:
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def _first(d: dict | None, *keys):
    """The first of `keys` present (and not None) in d: the metric files are read defensively."""
    for key in keys:
        if d and d.get(key) is not None:
            return d[key]
    return None


def _per_depth(value, key: str) -> list[float]:
    """Usage/perplexity per depth, stored as [{usage, perplexity}, ...], [x, ...] or {d: x}."""
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value, key=str)]
    if not isinstance(value, list):
        return []
    return [_num(v.get(key) if isinstance(v, dict) else v) for v in value]


@lru_cache(maxsize=1)
def load_published() -> dict:
    with open(PUBLISHED_PATH) as f:
        return yaml.safe_load(f)


def published_table(section: str) -> pd.DataFrame:
    """Rows of one section of published.yaml, with `source` = "published" and a short scale."""
    sec = load_published()[section]
    df = pd.DataFrame(sec["rows"])
    df.insert(0, "source", PUBLISHED)
    df["scale"] = sec["short_scale"]
    return df


def published_caption(section: str) -> str:
    sec = load_published()[section]
    return f"published: {sec['source']}; {sec['scale']}."


# ---- our results -------------------------------------------------------------------


def data_table(reader: _Reader) -> pd.DataFrame:
    rows = []
    for split in ("train", "val"):
        m = reader.json(f"data/{split}/manifest.json") or {}
        rows.append({"split": split, "source": m.get("source"), "images": m.get("num_images"),
                     "image_size": m.get("image_size"), "classes": m.get("num_classes"),
                     "has_text": m.get("has_text"), "skipped": m.get("skipped")})
    return pd.DataFrame(rows)


GENERATOR_COLUMNS = ["source", "name", "sampler", "kind", "size", "params", "tokenizer", "depth", "codes", "cfg_scale",
                     "temperature", "fid", "kid_mean", "inception_score", "precision", "recall", "ppl_ocr",
                     "images_per_s", "ms_per_step", "num_samples", "extractor", "device"]
TOKENIZER_COLUMNS = ["source", "name", "depth", "codebook_size", "codes", "psnr", "ssim", "l2", "rfid", "rocr",
                     "cer", "usage", "perplexity", "extractor", "psnr_partial"]


def tokenizer_table(cfg: dict, reader: _Reader) -> pd.DataFrame:
    rows = []
    for name, tok in cfg["tokenizers"].items():
        m = reader.json(f"metrics/tokenizer/{name}.json")
        per_depth = _first(m, "per_depth", "usage")  # [{depth, usage, perplexity, psnr_partial}, ...]
        usage_d, ppl_d = _per_depth(per_depth, "usage"), _per_depth(per_depth, "perplexity")
        grid = cfg["data"]["image_size"] // downsample_factor(tok)
        rows.append({
            "source": "this run", "name": name,
            "depth": _first(m, "depth") or tok["quantizer"]["depth"],
            "codebook_size": _first(m, "codebook_size") or tok["quantizer"]["codebook_size"],
            "codes": f"{grid}x{grid}x{tok['quantizer']['depth']}",
            "psnr": _num(_first(m, "psnr")), "ssim": _num(_first(m, "ssim")), "l2": _num(_first(m, "l2")),
            "rfid": _num(_first(m, "rfid", "fid")), "rocr": _num(_first(m, "rocr_rouge_l", "rouge_l")),
            "cer": _num(_first(m, "rocr_cer", "cer")),
            "usage": float(np.nanmean(usage_d)) if usage_d else np.nan,
            "perplexity": float(np.nanmean(ppl_d)) if ppl_d else np.nan,
            "extractor": _first(m, "extractor"),
            "psnr_partial": _per_depth(per_depth, "psnr_partial"),
        })
    return pd.DataFrame(rows, columns=TOKENIZER_COLUMNS)


def _params(n) -> str | None:
    return None if n is None else f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def kind_label(gen: dict) -> str:
    """The generator kind with the variant options that change what it predicts per step."""
    if gen["kind"] == "dnd" and gen.get("heads") == "parallel":
        return "dnd (parallel heads)"
    if gen["kind"] == "ar1d" and gen.get("flatten"):
        return "ar1d (flattened)"
    return gen["kind"]


def generator_table(cfg: dict, reader: _Reader) -> pd.DataFrame:
    rows = []
    for name, gen in cfg["generators"].items():
        tok = cfg["tokenizers"][gen["tokenizer"]]
        grid = cfg["data"]["image_size"] // downsample_factor(tok)
        depth = code_depth(cfg, gen)
        for sampler_name, sampler in cfg["samplers"].items():
            m = reader.json(f"metrics/{name}/{sampler_name}.json")
            timing = reader.json(f"samples/{name}/{sampler_name}/timing.json")
            rows.append({
                "source": "this run", "name": name, "sampler": sampler_name, "kind": kind_label(gen),
                "size": gen["size"], "params": _params(_first(timing, "num_params")),
                "tokenizer": gen["tokenizer"], "depth": depth,
                "codes": f"{grid}x{grid}x{depth}", "cfg_scale": sampler["cfg_scale"],
                "temperature": str(sampler["temperature"]),
                "fid": _num(_first(m, "fid")), "kid_mean": _num(_first(m, "kid_mean")),
                "inception_score": _num(_first(m, "inception_score")),
                "precision": _num(_first(m, "precision")), "recall": _num(_first(m, "recall")),
                "ppl_ocr": _num(_first(m, "ppl_ocr")),
                "images_per_s": _num(_first(m, "images_per_s") or _first(timing, "images_per_s")),
                "ms_per_step": _num(_first(timing, "ms_per_step")),
                "num_samples": _first(m, "num_samples") or _first(timing, "num_samples"),
                "extractor": _first(m, "extractor"),
                "device": _first(timing, "device"),
            })
    return pd.DataFrame(rows, columns=GENERATOR_COLUMNS)


def speed_table(generators: pd.DataFrame) -> pd.DataFrame:
    cols = ["name", "sampler", "kind", "size", "depth", "codes", "images_per_s", "ms_per_step", "device"]
    return generators[[c for c in cols if c in generators]].copy()


def reference_metrics(reader: _Reader) -> dict:
    m = reader.json("metrics/reference.json") or {}
    return {"rocr_real": _num(_first(m, "ocr_rouge_l", "rouge_l_real")),
            "ppl_ocr_real": _num(_first(m, "ppl_ocr", "ppl_ocr_real")), "ppl_text": _num(_first(m, "ppl_text")),
            "fid_val_vs_train": _num(_first(m, "fid_val_vs_train")), "extractor": _first(m, "extractor"),
            "ppl_lm": _first(m, "ppl_lm")}


def loss_curves(cfg: dict, reader: _Reader) -> dict[str, pd.DataFrame]:
    out = {}
    for name in cfg["generators"]:
        df = reader.csv(f"generators/{name}/losses.csv")
        if df is not None and "step" in df:
            out[name] = df
    return out


def heldout_table(cfg: dict, reader: _Reader) -> pd.DataFrame:
    """Per generator: eval-mode cross-entropy on train and val codes (nats per code), and per depth on val."""
    rows = []
    for name, gen in cfg["generators"].items():
        m = reader.json(f"metrics/heldout/{name}.json") or {}
        rows.append({"name": name, "kind": kind_label(gen), "tokenizer": gen["tokenizer"],
                     "depth": code_depth(cfg, gen), "train_ce": _num(m.get("train_ce")),
                     "val_ce": _num(m.get("val_ce")), "ce_gap": _num(m.get("gap")),
                     "val_ce_per_depth": " / ".join(f"{v:.2f}" for v in m.get("val_ce_per_depth", [])) or None,
                     "heldout_items": m.get("num_items")})
    return pd.DataFrame(rows)


def depth_cost_table(reader: _Reader) -> tuple[pd.DataFrame, dict]:
    """metrics/depth_cost.json: one row per (kind, depth) with images/s, ms per step and the
    slowdown against the same kind at its shallowest depth; and the measurement's plan."""
    cols = ["kind", "depth", "steps", "params", "images_per_s", "ms_per_step", "slowdown"]
    m = reader.json("metrics/depth_cost.json") or {}
    df = pd.DataFrame(m.get("rows", []), columns=cols[:-1])
    df["kind"] = [kind_label({"kind": k, "flatten": True}) for k in df["kind"]]  # the sweep's 1-D AR is flattened
    df["params"] = [_params(n) for n in df["params"]]
    df["images_per_s"] = pd.to_numeric(df["images_per_s"], errors="coerce")
    first = df.sort_values("depth").groupby("kind")["images_per_s"].transform("first") if len(df) else df["images_per_s"]
    df["slowdown"] = first / df["images_per_s"]
    plan = {**m.get("plan", {}), "device": m.get("gpu") or m.get("device"), "torch_threads": m.get("torch_threads")}
    return df[cols], plan if m else {}


def sample_grids(cfg: dict, reader: _Reader) -> dict[tuple[str, str], Path]:
    out = {}
    for name in cfg["generators"]:
        for sampler in cfg["samplers"]:
            path = reader.file(f"samples/{name}/{sampler}/grid.png")
            if path is not None:
                out[(name, sampler)] = path
    return out


def read_benchmark(path: Path) -> dict | None:
    """One Snakemake benchmark TSV: the mean over its repeats (usually one row)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError:
        return None
    if not rows:
        return None

    def mean(key: str) -> float:
        return float(np.nanmean([_num(r.get(key)) for r in rows]))

    return {"seconds": mean("s"), "max_rss_mb": mean("max_rss"), "cpu_seconds": mean("cpu_time"),
            "mean_load": mean("mean_load")}


def stage_cost_table(benchmarks_dir: Path | None) -> pd.DataFrame:
    """Wall time and peak memory per job, from results/{exp}/benchmarks/{rule}/{variant}.tsv."""
    cols = ["rule", "variant", "seconds", "max_rss_mb", "cpu_seconds", "mean_load"]
    if benchmarks_dir is None or not Path(benchmarks_dir).is_dir():
        return pd.DataFrame(columns=cols)
    rows = []
    for path in sorted(Path(benchmarks_dir).rglob("*.tsv")):
        rel = path.relative_to(benchmarks_dir).with_suffix("")
        bench = read_benchmark(path)
        if bench is None or len(rel.parts) < 2:
            continue
        rows.append({"rule": rel.parts[0], "variant": "/".join(rel.parts[1:]), **bench})
    df = pd.DataFrame(rows, columns=cols)
    order = {rule: i for i, rule in enumerate(STAGE_ORDER)}
    df["order"] = [order.get(r, len(order)) for r in df["rule"]]
    return df.sort_values(["order", "rule", "variant"]).drop(columns="order").reset_index(drop=True)


def comparison_table(generators: pd.DataFrame, stage_cost: pd.DataFrame) -> pd.DataFrame:
    """Per generator and sampler: quality, sampling speed, and what training it cost."""
    train = stage_cost[stage_cost["rule"] == "train_generator"].set_index("variant")
    df = generators[["name", "sampler", "kind", "depth", "fid", "ppl_ocr", "images_per_s"]].copy()
    df["train_seconds"] = [_num(train["seconds"].get(n)) if n in train.index else np.nan for n in df["name"]]
    df["train_peak_mb"] = [_num(train["max_rss_mb"].get(n)) if n in train.index else np.nan for n in df["name"]]
    best = df["fid"].min() if df["fid"].notna().any() else np.nan
    df["fid_vs_best"] = df["fid"] / best if np.isfinite(best) and best > 0 else np.nan
    return df.sort_values(["sampler", "fid"], na_position="last").reset_index(drop=True)


def hardware() -> dict:
    """The machine that renders the report (in a local run, the one every stage ran on)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"cpu": f"{cpu} ({os.cpu_count()} logical cores)", "gpu": ", ".join(gpus) or "none",
            "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def collect(cfg: dict, results_dir: Path, *, benchmarks_dir: Path | None = None) -> Results:
    reader = _Reader(results_dir)
    generators = generator_table(cfg, reader)
    tokenizers = tokenizer_table(cfg, reader)
    stage_cost = stage_cost_table(benchmarks_dir)
    reference = reference_metrics(reader)
    depth_cost, depth_cost_plan = depth_cost_table(reader)
    extractors = sorted({e for e in [*generators["extractor"], *tokenizers["extractor"], reference["extractor"]]
                         if isinstance(e, str) and e})
    return Results(
        data=data_table(reader), tokenizers=tokenizers, generators=generators,
        comparison=comparison_table(generators, stage_cost), speed=speed_table(generators),
        reference=reference, losses=loss_curves(cfg, reader), heldout=heldout_table(cfg, reader),
        depth_cost=depth_cost, depth_cost_plan=depth_cost_plan,
        grids=sample_grids(cfg, reader),
        stage_cost=stage_cost, extractors=extractors, missing=reader.missing,
    )
