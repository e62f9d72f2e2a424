"""Held-out cross-entropy of a trained generator: its teacher-forced loss on the val split's codes.

losses.csv holds the loss of training batches with dropout on. This is measured in eval
mode on every val item and, as the point of comparison, on as many train items, so the
gap between the two shows how much of a low training loss is memorisation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dnd.checkpoint import save_json
from dnd.codes import load_codes


def plain_view_codes(codes_dir: Path, depth: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int64 (N, h*w, depth) of the first stored view, labels int64 (N,)) of a codes folder."""
    codes, labels, _ = load_codes(codes_dir)  # (N, A, h, w, D) int16, (N,)
    n = len(codes) if limit is None else min(limit, len(codes))
    if codes.shape[-1] < depth:
        raise ValueError(f"{codes_dir}: holds {codes.shape[-1]} code depths, the generator predicts {depth}")
    first = np.asarray(codes[:n, 0, :, :, :depth], dtype=np.int64)  # (n, h, w, depth)
    return torch.from_numpy(first.reshape(n, -1, depth)), torch.from_numpy(labels[:n])


@torch.no_grad()
def cross_entropy(model, codes: torch.Tensor, labels: torch.Tensor, *, batch_size: int) -> tuple[float, list[float]]:
    """Mean cross-entropy per code (nats) and per depth, of the eval-mode model on (N, L, D) codes."""
    device = model.device
    total, per_depth = 0.0, torch.zeros(model.depth, dtype=torch.float64)
    for start in range(0, len(codes), batch_size):
        batch = codes[start:start + batch_size].to(device)
        cond = labels[start:start + batch_size].to(device) if model.num_classes > 0 else None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(batch, cond)
        total += float(loss) * len(batch)
        per_depth += model.last_depth_losses.double().cpu() * len(batch)
    n = len(codes)
    return total / n, (per_depth / n).tolist()


def heldout_loss(model_path: Path, val_codes: Path, train_codes: Path, out_path: Path, *, batch_size: int,
                 device) -> dict:
    """Write and return {val_ce, train_ce, per depth, num_items} for the generator `model_path`."""
    from dnd import generators

    model = generators.load(model_path, device=device)
    val, val_labels = plain_view_codes(val_codes, model.depth)
    train, train_labels = plain_view_codes(train_codes, model.depth, limit=len(val))
    if val.shape[1:] != train.shape[1:]:
        raise ValueError(f"{val_codes} and {train_codes}: code grids differ ({tuple(val.shape[1:])} vs "
                         f"{tuple(train.shape[1:])}): not codes of the same tokenizer")
    val_ce, val_depth = cross_entropy(model, val, val_labels, batch_size=batch_size)
    train_ce, train_depth = cross_entropy(model, train, train_labels, batch_size=batch_size)
    result = {"val_ce": val_ce, "val_ce_per_depth": val_depth, "train_ce": train_ce,
              "train_ce_per_depth": train_depth, "gap": val_ce - train_ce, "num_items": len(val),
              "units": "nats per code, eval mode, first stored view"}
    save_json(result, out_path)
    return result
