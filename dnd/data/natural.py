"""A small natural-image set for smoke runs: seeded random crops of scikit-image's sample photographs.

The colour photographs that ship inside the scikit-image distribution load offline.
Each photograph is one class, so class-conditional generators have real classes to
tell apart. A crop is a random square covering between `MIN_CROP_FRACTION` and all
of the photograph's short side, at a random position, resized to the target size.
"""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# (class name, skimage.data function, index into its result when it returns a tuple)
PHOTOS = (
    ("astronaut", "astronaut", None),
    ("coffee", "coffee", None),
    ("chelsea", "chelsea", None),
    ("rocket", "rocket", None),
    ("hubble_deep_field", "hubble_deep_field", None),
    ("immunohistochemistry", "immunohistochemistry", None),
    ("retina", "retina", None),
    # The right view of the stereo pair is left out: it is nearly the same picture.
    ("motorcycle", "stereo_motorcycle", 0),
)
MIN_CROP_FRACTION = 0.25


def load_photos() -> tuple[list[str], list[np.ndarray]]:
    """(names, uint8 (H, W, 3) arrays) of the sample photographs this installation can load offline."""
    import skimage.data

    names, photos = [], []
    for name, function, index in PHOTOS:
        try:
            photo = getattr(skimage.data, function)()
        except Exception as e:  # noqa: BLE001 - a photo that needs a download is simply not used
            log.warning("skimage.data.%s is not available offline (%s); photo %r is left out",
                        function, type(e).__name__, name)
            continue
        photo = np.asarray(photo if index is None else photo[index])
        if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
            raise ValueError(f"skimage.data.{function}: expected a uint8 (H, W, 3) photograph, "
                             f"got {photo.dtype} {photo.shape}")
        names.append(name)
        photos.append(photo)
    if not photos:
        raise ValueError("data.source skimage: none of the scikit-image sample photographs "
                         f"({', '.join(n for n, _, _ in PHOTOS)}) could be loaded")
    return names, photos


def random_crops(photos: list[np.ndarray], labels: np.ndarray, *, image_size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """One random square crop of `photos[label]` per label, resized to uint8 (N, image_size, image_size, 3)."""
    out = np.empty((len(labels), image_size, image_size, 3), np.uint8)  # (N, S, S, 3)
    for i, label in enumerate(labels):
        photo = photos[label]
        h, w = photo.shape[:2]
        short = min(h, w)
        side = int(rng.integers(max(1, round(MIN_CROP_FRACTION * short)), short + 1))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top: top + side, left: left + side])
        # PIL's BICUBIC widens its kernel when shrinking, so downscaling is antialiased.
        out[i] = np.asarray(crop.resize((image_size, image_size), resample=Image.BICUBIC))
    return out


def balanced_labels(num_images: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels 0..num_classes-1 in near-equal numbers, in random order (int64, N)."""
    labels = np.arange(num_images, dtype=np.int64) % num_classes
    rng.shuffle(labels)
    return labels
