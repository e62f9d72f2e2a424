"""The on-disk format of one data split, and its writer and reader.

A split folder holds:

- `images.npy`: uint8 (N, H, W, 3), a plain .npy file, opened memory-mapped;
- `labels.npy`: int64 (N,), class indices (all 0 for unconditional data);
- `text.jsonl`: for text data only, one `{"index": i, "text": ...}` per image, in image order;
- `manifest.json`: what the split is (source, sizes, classes, config, hashes), written last.

Every file is written under a temporary name and renamed into place, and the writer
deletes an old manifest before it touches anything else, so a folder with a
manifest is a complete split and a folder without one is not.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnd.checkpoint import atomic_path, save_json, save_npy

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
TEXT_FILE = "text.jsonl"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_COPY_ROWS = 1024  # rows per chunk when an over-allocated image array is cut to size


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SplitWriter:
    """Write one split image by image without holding it in memory.

    ```
    with SplitWriter(split_dir, capacity=n, image_size=s, with_text=False) as writer:
        for image, label in ...:
            writer.append(image, label)
        manifest = writer.commit({"source": ..., ...})
    ```
    `capacity` is the most images the split can get; fewer is allowed (skipped files),
    and `commit` then cuts the array to size. Leaving the block without `commit`, or
    with an exception, removes every temporary file and leaves no manifest.
    """

    def __init__(self, split_dir: str | Path, *, capacity: int, image_size: int, with_text: bool):
        self.split_dir = Path(split_dir)
        self.capacity, self.image_size, self.with_text = capacity, image_size, with_text
        self.labels: list[int] = []
        self.texts: list[str] = []
        self._scratch: Path | None = None
        self._images: np.memmap | None = None

    def __enter__(self) -> "SplitWriter":
        self.split_dir.mkdir(parents=True, exist_ok=True)
        # From here on the folder is an incomplete split until commit writes a new manifest.
        (self.split_dir / MANIFEST_FILE).unlink(missing_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{IMAGES_FILE}.", suffix=".tmp", dir=self.split_dir)
        os.close(fd)
        self._scratch = Path(name)
        shape = (self.capacity, self.image_size, self.image_size, 3)
        self._images = np.lib.format.open_memmap(self._scratch, mode="w+", dtype=np.uint8, shape=shape)
        return self

    def append(self, image: np.ndarray, label: int, text: str | None = None) -> None:
        n = len(self.labels)
        if n == self.capacity:
            raise ValueError(f"{self.split_dir}: more than the {self.capacity} images this split was opened for")
        if image.shape != self._images.shape[1:] or image.dtype != np.uint8:
            raise ValueError(f"{self.split_dir}: image {n} is {image.dtype} {image.shape}, "
                             f"expected uint8 {self._images.shape[1:]}")
        if (text is None) == self.with_text:
            raise ValueError(f"{self.split_dir}: image {n} " + ("needs a text" if self.with_text else "has a text")
                             + f" but the split was opened with with_text={self.with_text}")
        self._images[n] = image
        self.labels.append(int(label))
        if text is not None:
            self.texts.append(text)

    def __len__(self) -> int:
        return len(self.labels)

    def commit(self, fields: dict) -> dict:
        """Move every file into place, then write and return the manifest (`fields` plus sizes and hashes)."""
        n = len(self.labels)
        if n == 0:
            raise ValueError(f"{self.split_dir}: no image was written to this split")
        images_path = self.split_dir / IMAGES_FILE
        self._images.flush()
        self._images = None  # close the memory map before the file is renamed or read
        if n == self.capacity:
            with open(self._scratch, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self._scratch, images_path)
        else:
            self._cut_to(n, images_path)
        self._scratch = None
        save_npy(np.asarray(self.labels, dtype=np.int64), self.split_dir / LABELS_FILE)
        if self.with_text:
            with atomic_path(self.split_dir / TEXT_FILE) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    for i, text in enumerate(self.texts):
                        f.write(json.dumps({"index": i, "text": text}, ensure_ascii=False) + "\n")
        else:
            (self.split_dir / TEXT_FILE).unlink(missing_ok=True)  # a stale one from an earlier text run
        manifest = {
            **fields,
            "format_version": FORMAT_VERSION,
            "num_images": n,
            "image_size": self.image_size,
            "has_text": self.with_text,
            "images_sha256": file_sha256(images_path),
            "labels_sha256": file_sha256(self.split_dir / LABELS_FILE),
        }
        if self.with_text:
            manifest["text_sha256"] = file_sha256(self.split_dir / TEXT_FILE)
        save_json(manifest, self.split_dir / MANIFEST_FILE)
        return manifest

    def _cut_to(self, n: int, images_path: Path) -> None:
        full = np.load(self._scratch, mmap_mode="r")
        with atomic_path(images_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *full.shape[1:]))
            for start in range(0, n, _COPY_ROWS):
                out[start: start + _COPY_ROWS] = full[start: min(n, start + _COPY_ROWS)]
            out.flush()
            del out
        del full
        self._scratch.unlink()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._images = None
        if self._scratch is not None:  # an exception, or no commit: nothing of this run stays
            self._scratch.unlink(missing_ok=True)
            self._scratch = None


@dataclass
class Split:
    """One split as stored: `images` is a copy-on-write memory map, so large splits are not read into RAM
    and nothing done to the array in memory ever reaches the file."""

    images: np.ndarray   # uint8 (N, H, W, 3)
    labels: np.ndarray   # int64 (N,)
    texts: list[str] | None
    manifest: dict

    def __len__(self) -> int:
        return len(self.labels)


def load_split(split_dir: str | Path, *, verify: bool = False) -> Split:
    """Open a split written by `SplitWriter`; `verify` also checks the files' sha256 against the manifest.

    Raises FileNotFoundError when the folder or a file is missing (a missing manifest
    means the split was never completed) and ValueError when the files disagree with
    the manifest.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data split {split_dir}: folder not found; run the prepare_data stage first")
    manifest_path = split_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"data split {split_dir}: {MANIFEST_FILE} missing, so the split is incomplete "
                                f"(prepare_data did not finish); run prepare_data again")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}: not valid JSON ({e})") from None
    needed = [IMAGES_FILE, LABELS_FILE] + ([TEXT_FILE] if manifest.get("has_text") else [])
    missing = [name for name in needed if not (split_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"data split {split_dir}: {', '.join(missing)} missing although "
                                f"{MANIFEST_FILE} is present; run prepare_data again")
    n, size = manifest["num_images"], manifest["image_size"]

    def bad(what: str):
        return ValueError(f"data split {split_dir}: {what}; the split does not match its {MANIFEST_FILE}, "
                          f"run prepare_data again")

    # copy-on-write map: the array is writable (torch.from_numpy does not warn) but writes stay in memory
    images = np.load(split_dir / IMAGES_FILE, mmap_mode="c")
    if images.dtype != np.uint8 or images.shape != (n, size, size, 3):
        raise bad(f"{IMAGES_FILE} is {images.dtype} {images.shape}, expected uint8 {(n, size, size, 3)}")
    labels = np.load(split_dir / LABELS_FILE)
    if labels.dtype != np.int64 or labels.shape != (n,):
        raise bad(f"{LABELS_FILE} is {labels.dtype} {labels.shape}, expected int64 ({n},)")
    texts = None
    if manifest.get("has_text"):
        with open(split_dir / TEXT_FILE, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        if [r["index"] for r in rows] != list(range(n)):
            raise bad(f"{TEXT_FILE} does not hold indices 0..{n - 1} in order")
        texts = [r["text"] for r in rows]
    if verify:
        for name, key in ((IMAGES_FILE, "images_sha256"), (LABELS_FILE, "labels_sha256"), (TEXT_FILE, "text_sha256")):
            if key in manifest and file_sha256(split_dir / name) != manifest[key]:
                raise bad(f"{name} has a different sha256 than recorded")
    return Split(images=images, labels=labels, texts=texts, manifest=manifest)
