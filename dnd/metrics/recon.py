"""Reconstruction metrics on uint8 image arrays (N, H, W, 3) and code statistics per depth."""
from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

# PSNR of an exact reconstruction is infinite; cap it so that means stay finite.
PSNR_CAP_DB = 100.0


def _check_pair(real: np.ndarray, fake: np.ndarray) -> None:
    if real.shape != fake.shape or real.ndim != 4 or real.shape[-1] != 3:
        raise ValueError(f"expected two uint8 arrays of the same shape (N, H, W, 3); "
                         f"got {real.shape} and {fake.shape}")
    if real.dtype != np.uint8 or fake.dtype != np.uint8:
        raise ValueError(f"expected uint8 images; got {real.dtype} and {fake.dtype}")


def psnr_per_image(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """PSNR in dB of each image pair (peak 255), capped at PSNR_CAP_DB -> (N,)."""
    _check_pair(real, fake)
    mse = ((real.astype(np.float64) - fake.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(255.0 ** 2 / mse)
    return np.minimum(db, PSNR_CAP_DB)


def psnr(real: np.ndarray, fake: np.ndarray) -> float:
    """Mean over images of the per-image PSNR in dB."""
    return float(psnr_per_image(real, fake).mean())


def ssim(real: np.ndarray, fake: np.ndarray) -> float:
    """Mean over images of skimage's SSIM (colour, data range 255)."""
    _check_pair(real, fake)
    return float(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255)
                          for a, b in zip(real, fake)]))


def l2(real: np.ndarray, fake: np.ndarray) -> float:
    """Mean squared error in [-1, 1] pixel units (the paper's L2 column)."""
    _check_pair(real, fake)
    diff = (real.astype(np.float64) - fake.astype(np.float64)) / 127.5
    return float((diff ** 2).mean())


def code_usage(codes: np.ndarray, codebook_size: int) -> list[dict[str, float]]:
    """Per depth of codes (..., D): fraction of the codebook used and perplexity exp(entropy)."""
    flat = np.asarray(codes).reshape(-1, codes.shape[-1])
    if flat.size and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"codes lie in [{flat.min()}, {flat.max()}], outside [0, {codebook_size})")
    out = []
    for d in range(flat.shape[1]):
        counts = np.bincount(flat[:, d], minlength=codebook_size)
        p = counts[counts > 0] / counts.sum()
        out.append({"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))})
    return out


def recon_metrics(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    return {"psnr": psnr(real, fake), "ssim": ssim(real, fake), "l2": l2(real, fake)}
