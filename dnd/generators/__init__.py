"""Generators over residual codes: DnD-Transformer, 1-D AR and RQ-Transformer on one backbone.

`build(kind, size, ...)` makes a model from plain arguments (recorded in
`model.model_args`, so that a checkpoint rebuilds it), `load(path)` rebuilds one from a
checkpoint with its EMA weights, `Sampler` says how `model.generate` picks codes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dnd.checkpoint import load_checkpoint
from dnd.generators.ar1d import FlattenedAR
from dnd.generators.backbone import PRESETS, CodeGenerator
from dnd.generators.dnd import DnDTransformer, default_head_layers
from dnd.generators.rqtransformer import RQTransformer
from dnd.generators.sampling import Sampler

__all__ = ["PRESETS", "CodeGenerator", "DnDTransformer", "FlattenedAR", "RQTransformer", "Sampler", "build",
           "default_head_layers", "load"]

KINDS = ("dnd", "ar1d", "rqt")
COMMON_OVERRIDES = ("n_layer", "n_head", "dim", "dropout", "token_dropout", "class_dropout")
# Kind-specific options with their neutral values: another kind may receive them (a
# config carries all of them) as long as they are left at these values.
KIND_OPTIONS = {
    "dnd": {"head_layers": None, "heads": "spread"},
    "ar1d": {"flatten": False},
    "rqt": {"depth_layers": 1, "soft_targets": 0.0},
}


def build(kind: str, size: str, *, depth: int, codebook_size: int, grid: int, num_classes: int = 0,
          **overrides) -> CodeGenerator:
    """A generator of `kind` ("dnd", "ar1d", "rqt") with the `size` preset's layers, heads and width.

    overrides: n_layer, n_head, dim, dropout, token_dropout, class_dropout; dnd: head_layers
    (list | None), heads ("spread" | "parallel"); ar1d: flatten (bool); rqt: depth_layers
    (int), soft_targets (float), codebook (tensor (N, C), not recorded in model_args).
    """
    if kind not in KINDS:
        raise ValueError(f"generator kind: expected one of {KINDS}, got {kind!r}")
    if size not in PRESETS:
        raise ValueError(f"generator size: expected one of {list(PRESETS)}, got {size!r}")
    codebook = overrides.pop("codebook", None)
    known = set(COMMON_OVERRIDES).union(*KIND_OPTIONS.values())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"generator {kind}: unknown option(s) {unknown}; known: {sorted(known)}")
    for other, options in KIND_OPTIONS.items():
        for key, neutral in options.items():
            if other != kind and key in overrides and overrides[key] != neutral:
                raise ValueError(f"generator {kind}: option {key}={overrides[key]!r} only applies to kind {other!r}")
    if codebook is not None and kind != "rqt":
        raise ValueError(f"generator {kind}: codebook is only used by rqt soft targets")

    common = {k: overrides[k] for k in COMMON_OVERRIDES if k in overrides}
    specific = {k: overrides.get(k, v) for k, v in KIND_OPTIONS[kind].items()}
    args = dict(PRESETS[size], **common, depth=depth, codebook_size=codebook_size, grid=grid,
                num_classes=num_classes)
    if kind == "dnd":
        model = DnDTransformer(**args, **specific)
    elif kind == "rqt":
        model = RQTransformer(**args, **specific, codebook=codebook)
    elif specific["flatten"]:
        model = FlattenedAR(**args)
    else:
        if depth != 1:
            raise ValueError(f"generator ar1d: {depth}-deep codes need flatten=True (or a depth-1 tokenizer)")
        model = DnDTransformer(**args)  # one code per position: the single-head DnD model
    if specific.get("head_layers") is not None:
        specific["head_layers"] = [int(i) for i in specific["head_layers"]]
    model.model_args = {"kind": kind, "size": size, "depth": depth, "codebook_size": codebook_size,
                        "grid": grid, "num_classes": num_classes, **common, **specific}
    return model


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> CodeGenerator:
    """Rebuild a generator from a checkpoint alone: `build(**model_args)`, then the EMA weights
    (`ema`, a state dict with the keys of `model`) when present, else `model`, loaded strictly.
    Returned in eval mode, its weights cast to `dtype` when given.

    Sampling on a GPU wants dtype=torch.bfloat16 (as LlamaGen samples): a decode step is
    bound by reading the weights, and fp32 weights under bf16 autocast are re-cast on every
    step of a captured CUDA graph, moving 4x the bytes of bf16 weights."""
    ckpt = load_checkpoint(path, map_location=device)
    for key in ("model_args", "model"):
        if key not in ckpt:
            raise KeyError(f"{path}: not a generator checkpoint (missing key {key!r})")
    model = build(**ckpt["model_args"])
    state = ckpt.get("ema") or ckpt["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: weights do not match model_args {ckpt['model_args']}: {e}") from e
    return model.to(device=device, dtype=dtype).eval()
