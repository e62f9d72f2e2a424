"""Stage functions of `evaluate` and `reference_stats`: read artifacts, compute metrics, write JSON.

Conventions (paper-results.md, "Evaluation conventions"): gFID compares generated
samples with the training split's reference features; rFID compares reconstructions of
the validation split with the validation split, at the same resolution. Every JSON
names the extractor that produced its FID and the reference it was measured against,
and every number is also logged with the tracker.

Split directories (written by prepare_data) hold images.npy (uint8 (N, H, W, 3)) and,
for text data, text.jsonl with lines {"index": i, "text": ground truth of image i}.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from dnd.checkpoint import save_json
from dnd.metrics.fid import (check_images, check_matches_reference, extract_features, fid_from_features,
                             load_features, save_features)
from dnd.metrics.ngram import CharNgramLM
from dnd.metrics.ocr import SCORE_COLUMNS, ocr_scores
from dnd.tracking import NullTracker, Tracker


def load_images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (uint8 (N, H, W, 3) images expected)")
    return check_images(np.load(path, mmap_mode="c"), str(path))  # copy-on-write: the file is never modified


def load_texts(split_dir: Path) -> list[str]:
    """Ground-truth texts of a split, ordered by image index."""
    path = split_dir / "text.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; text data needs the ground-truth texts written by prepare_data")
    by_index = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    by_index[int(row["index"])] = row["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{line_no}: expected {{\"index\": int, \"text\": str}}, got {line.strip()[:80]!r}") from e
    missing = sorted(set(range(len(by_index))) - by_index.keys())
    if missing:
        raise ValueError(f"{path}: indices are not 0..{len(by_index) - 1}; missing {missing[:5]}")
    return [by_index[i] for i in range(len(by_index))]


def _finish(result: dict, out_json: Path, tracker: Tracker | None) -> dict:
    save_json(result, out_json)
    tracker = tracker or NullTracker()
    tracker.log_metrics(result)  # the tracker keeps the numbers (texts, lists and None are skipped)
    tracker.log_artifact(out_json)
    return result


def _fid_entries(metrics: dict, name: str) -> dict:
    """torch-fidelity's numbers under this JSON's names (`name` for the FID itself)."""
    out = {k: v for k, v in metrics.items() if k not in ("fid", "num_a", "num_b")}
    out[name] = metrics["fid"]
    return out


def _extract(images: np.ndarray, fid_cfg: dict, device, desc: str) -> dict[str, np.ndarray]:
    return extract_features(images, weights=fid_cfg["inception_weights"], batch_size=fid_cfg["batch_size"],
                            device=device, desc=desc)


def _fit_lm(train_split_dir: Path, order: int) -> CharNgramLM:
    return CharNgramLM(order).fit(load_texts(train_split_dir))


def _ocr_entries(images: np.ndarray, texts: list[str] | None, prefix: str, device) -> tuple[dict, list[str]]:
    """Mean OCR scores (when texts are given) under `prefix`, per-image rows, and the OCR'd texts."""
    table = ocr_scores(images, texts, gpu=torch.device(device).type == "cuda")
    out: dict = {f"{prefix}num_images": len(table)}
    if texts is not None:
        out.update({f"{prefix}{c}": float(table[c].mean()) for c in SCORE_COLUMNS})
    out[f"{prefix}per_image"] = [{"index": i, **row} for i, row in enumerate(table.to_dict("records"))]
    return out, list(table["ocr_text"])


def _ppl_entries(lm: CharNgramLM, texts: list[str], name: str) -> dict:
    """`name`: perplexity of all texts together (exp of the mean per-character NLL, each text's end
    symbol included, so an empty read still counts); its per-image median; the share of empty reads."""
    scored = [lm.log_prob(t) for t in texts]
    nll = -sum(logp for logp, _ in scored) / sum(count for _, count in scored)
    per_image = [math.exp(-logp / count) for logp, count in scored]
    return {name: math.exp(nll), f"{name}_median": statistics.median(per_image),
            f"{name}_empty_fraction": sum(not t.strip() for t in texts) / len(texts), "ppl_lm": lm.describe()}


def _fid_against(images: np.ndarray, source: Path, ref_path: Path, ref_name: str, name: str, fid_cfg: dict,
                 device) -> dict:
    """FID-family entries (prefixed `name`) of `images` against cached reference features."""
    ref = load_features(ref_path)
    check_matches_reference(images, ref, str(source))
    feats = _extract(images, fid_cfg, device, f"{name} features")
    entries = _fid_entries(fid_from_features(feats, ref, kid_subset_size=fid_cfg["kid_subset_size"]), name)
    return {**entries, "reference": f"{ref_name}, {len(ref['2048'])} images"}


def reference_features(split_dir: Path, out_path: Path, *, eval_cfg: dict, device) -> None:
    """Inception features of a split's real images, cached once for every FID against it."""
    images = load_images(Path(split_dir) / "images.npy")
    save_features(_extract(images, eval_cfg["fid"], device, f"reference features {split_dir}"), out_path)


def evaluate_samples(samples_dir: Path, train_ref: Path, train_split_dir: Path, out_json: Path, *,
                     eval_cfg: dict, is_text: bool, device, tracker: Tracker | None = None) -> dict:
    """gFID/KID/precision-recall/IS of generated samples against the training split; PPL-OCR for text."""
    samples_dir, out_json = Path(samples_dir), Path(out_json)
    images = load_images(samples_dir / "images.npy")
    timing_path = samples_dir / "timing.json"
    if not timing_path.is_file():
        raise FileNotFoundError(f"{timing_path} not found; the sample stage writes it")
    timing = json.loads(timing_path.read_text())
    result: dict = {"num_samples": len(images), "images_per_s": timing.get("images_per_s"), "timing": timing}
    fid_cfg, ocr_cfg = eval_cfg["fid"], eval_cfg["ocr"]
    if fid_cfg["enabled"]:
        result.update(_fid_against(images, samples_dir / "images.npy", train_ref, "train split", "fid", fid_cfg,
                                   device))
    if is_text and ocr_cfg["enabled"]:
        n = min(ocr_cfg["max_images"], len(images))
        entries, texts = _ocr_entries(images[:n], None, "ocr_", device)
        result.update(entries)
        result.update(_ppl_entries(_fit_lm(Path(train_split_dir), ocr_cfg["ngram_order"]), texts, "ppl_ocr"))
    return _finish(result, out_json, tracker)


def evaluate_tokenizer(recon_dir: Path, val_split_dir: Path, val_ref: Path, out_json: Path, *,
                       eval_cfg: dict, is_text: bool, device, tracker: Tracker | None = None) -> dict:
    """rFID of validation reconstructions against the validation split, rOCR for text, and recon_metrics.json."""
    recon_dir, val_split_dir, out_json = Path(recon_dir), Path(val_split_dir), Path(out_json)
    recon = load_images(recon_dir / "recon.npy")
    metrics_path = recon_dir / "recon_metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found; the tokenizer stage writes it")
    result: dict = json.loads(metrics_path.read_text())
    result["num_reconstructions"] = len(recon)
    fid_cfg, ocr_cfg = eval_cfg["fid"], eval_cfg["ocr"]
    if fid_cfg["enabled"]:
        result.update(_fid_against(recon, recon_dir / "recon.npy", val_ref, "validation split", "rfid", fid_cfg,
                                   device))
    if is_text and ocr_cfg["enabled"]:
        texts = load_texts(val_split_dir)
        if len(texts) != len(recon):
            raise ValueError(f"{recon_dir / 'recon.npy'} has {len(recon)} reconstructions but "
                             f"{val_split_dir / 'text.jsonl'} has {len(texts)} texts; rOCR pairs them by index")
        n = min(ocr_cfg["max_images"], len(recon))
        result.update(_ocr_entries(recon[:n], texts[:n], "rocr_", device)[0])
    return _finish(result, out_json, tracker)


def evaluate_reference(val_split_dir: Path, train_split_dir: Path, out_json: Path, *, eval_cfg: dict,
                       is_text: bool, device, tracker: Tracker | None = None,
                       val_ref: Path | None = None, train_ref: Path | None = None) -> dict:
    """Bounds from real images: FID of the validation split against the training split (the floor at
    this sample size), and for text the OCR scores and PPL-OCR of real validation images.

    `val_ref`/`train_ref` are the cached reference features when available (else computed here).
    """
    val_split_dir, train_split_dir, out_json = Path(val_split_dir), Path(train_split_dir), Path(out_json)
    val_images = load_images(val_split_dir / "images.npy")
    fid_cfg, ocr_cfg = eval_cfg["fid"], eval_cfg["ocr"]
    result: dict = {"num_val_images": len(val_images)}
    if fid_cfg["enabled"]:
        val_feats = load_features(val_ref) if val_ref else _extract(val_images, fid_cfg, device, "validation features")
        train_feats = (load_features(train_ref) if train_ref else
                       _extract(load_images(train_split_dir / "images.npy"), fid_cfg, device, "train features"))
        metrics = fid_from_features(val_feats, train_feats, kid_subset_size=fid_cfg["kid_subset_size"])
        result.update(_fid_entries(metrics, "fid_val_vs_train"))
        result["reference"] = (f"validation split ({len(val_feats['2048'])} images) vs "
                               f"train split ({len(train_feats['2048'])} images)")
    if is_text and ocr_cfg["enabled"]:
        texts = load_texts(val_split_dir)
        n = min(ocr_cfg["max_images"], len(val_images), len(texts))
        entries, ocr_texts = _ocr_entries(val_images[:n], texts[:n], "ocr_", device)
        result.update(entries)
        lm = _fit_lm(train_split_dir, ocr_cfg["ngram_order"])
        result.update(_ppl_entries(lm, ocr_texts, "ppl_ocr"))
        result["ppl_text"] = _ppl_entries(lm, texts[:n], "ppl_text")["ppl_text"]  # the ground-truth text itself
    return _finish(result, out_json, tracker)
