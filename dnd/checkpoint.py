"""Atomic artifact writes and self-describing checkpoints.

Every file a stage produces is written to a temporary name in the same folder and
renamed into place, so a killed job never leaves a file that looks complete.
Checkpoints are dicts of tensors and plain data (`config`, `model_args`, `model`,
`ema`, `optimizer`, `step`, `rng`) and load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_npy(array: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def rng_state() -> dict:
    """RNG states as tensors/plain data (loadable with weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    """Atomically save a checkpoint dict. A failed write (full disk) leaves the old file intact."""
    required = {"config", "model_args", "model", "step"}
    missing = required - ckpt.keys()
    if missing:
        raise ValueError(f"checkpoint for {path} lacks keys {sorted(missing)}")
    # Never replace a good checkpoint with diverged weights: a finite loss can precede an
    # update that makes the weights inf/NaN.
    bad = [k for k, v in ckpt["model"].items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"non-finite model weights at step {ckpt['step']} ({bad[0]}, {len(bad)} tensors); "
                                 f"not writing {path}, the previous checkpoint, if any, is kept")
    try:
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
    except OSError as e:
        raise OSError(f"could not write checkpoint {path}: {e} (the previous checkpoint, if any, is intact)") from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"checkpoint {path} could not be loaded safely (weights_only=True): {e}") from e
