"""Photo data sets in ImageNet layout (`root/<class>/<image>`): decoding, colour conversion, ADM center crop.

Labels are the positions of the class folders in sorted order (torchvision's
ImageFolder convention, which the reference code uses). Every image is reduced to
8-bit RGB before cropping:

- grayscale (L, 1) is replicated into R, G and B;
- 16- and 32-bit integer grayscale (I;16, I) is scaled from 0..65535 to 0..255 with rounding;
- images with transparency (RGBA, LA, PA, palette with a transparent colour) are
  composited over a white background, so transparent areas read as an empty page
  rather than as whatever colour the encoder left under alpha 0;
- palette, CMYK and other colour modes go through PIL's conversion to RGB.

EXIF orientation is not applied, as in torchvision's loader.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# The extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(ValueError):
    """An image file that cannot be decoded into RGB; the message names the file."""


def list_images(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(sorted class names, [(image path, label), ...] in sorted order) for `root/<class>/**/<image>`.

    Raises ValueError naming the root when it has no class folder, and naming the class
    folder when it holds no image file.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root}: not a directory (data.image_folder.root)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root}: no class folders; expected the ImageNet layout "
                         f"root/<class>/<image>")
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in sorted(filenames)
                      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise ValueError(f"image folder {root}: class folder {root / name} holds no image file; "
                             f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
        items += [(f, label) for f in files]
    return classes, items


def to_rgb(image: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(image).astype(np.int64)  # (H, W)
        grey = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        raise BadImageError(f"{path}: floating-point image (mode F) has no defined 0..255 scale; "
                            f"expected an 8-bit or 16-bit image")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop (guided-diffusion, dnd-spec section 2) -> uint8 (image_size, image_size, 3).

    BOX-halve while the short side is at least twice the target, BICUBIC-resize the
    short side to the target, then cut the central square.
    """
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)  # (H', W', 3)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode, convert to RGB and center-crop one file; BadImageError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            rgb = to_rgb(image, path)
            return center_crop_arr(rgb, image_size)
    except BadImageError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{path}: cannot decode image ({type(e).__name__}: {e}); expected a readable, "
                            f"complete image file (or set data.skip_bad_images: true)") from None


def try_load_image(job: tuple[str, int]) -> np.ndarray | str:
    """`load_image` for a worker process: the image, or the error message when the file is bad."""
    path, image_size = job
    try:
        return load_image(path, image_size)
    except BadImageError as e:
        return str(e)


def try_load_images(jobs: list[tuple[str, int]]) -> list[np.ndarray | str]:
    """`try_load_image` over a chunk of files (one round trip to a worker process)."""
    return [try_load_image(job) for job in jobs]
