"""Data sets of the pipeline: build the train/val splits (`prepare_data`) and read them back (`load_split`).

Three sources, chosen by `data.source`:

- `text`: paragraphs of English text rendered on a white page, with their drawn text
  as ground truth (unconditional: every label is 0, `num_classes` is 0);
- `image_folder`: photos in ImageNet layout, labels from the sorted class folders;
- `skimage`: random crops of scikit-image's sample photographs, one class per photo.

The same config and seed reproduce the same bytes in every file.
"""
from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import platform
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from dnd.data.image_folder import BadImageError, list_images, try_load_image, try_load_images
from dnd.data.natural import balanced_labels, load_photos, random_crops
from dnd.data.shards import MANIFEST_FILE, Split, SplitWriter, file_sha256, load_split
from dnd.data.text import load_corpus, page_texts, render_text_images, resolve_font
from dnd.progress import Progress
from dnd.runtime import stage_seed
from dnd.tracking import NullTracker, Tracker

__all__ = ["prepare_data", "load_split", "Split", "BadImageError"]

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
_BATCH = 256  # images made per step, so a large split is never all in memory
_DECODE_CHUNK = 16   # image files per task sent to a decoding worker


def prepare_data(data_cfg: dict, out_dir: str | Path, *, seed: int, tracker: Tracker | None = None) -> dict:
    """Write `out_dir/train/` and `out_dir/val/` for the validated `cfg["data"]` block; return a summary.

    Summary: `{"source", "num_classes", "class_names", "skipped", "train": manifest, "val": manifest}`.
    """
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    builders = {"text": _prepare_text, "image_folder": _prepare_image_folder, "skimage": _prepare_skimage}
    source = data_cfg["source"]
    if source not in builders:
        raise ValueError(f"data.source {source!r}: expected one of {sorted(builders)}")
    # `workers` changes how fast, never what is written, so it stays out of the manifest.
    recorded = {k: v for k, v in data_cfg.items() if k != "workers"}
    common = {"source": source, "data_config": recorded, "seed": seed}
    # Until every split is rewritten, none of the old manifests may vouch for its folder.
    for split in SPLITS:
        (out_dir / split / MANIFEST_FILE).unlink(missing_ok=True)
    manifests = builders[source](data_cfg, out_dir, seed=seed, common=common)
    skipped = sum(m["skipped"] for m in manifests.values())
    tracker.log_metrics({"train_images": manifests["train"]["num_images"],
                         "val_images": manifests["val"]["num_images"], "skipped_images": skipped})
    for split in SPLITS:
        tracker.log_artifact(out_dir / split / MANIFEST_FILE)
    return {"source": source, "num_classes": manifests["train"]["num_classes"],
            "class_names": manifests["train"]["class_names"], "skipped": skipped, **manifests}


# --- text -------------------------------------------------------------------------------------

def _split_paragraphs(paragraphs: list[str], *, num_train: int, num_val: int,
                      rng: np.random.Generator) -> dict[str, list[str]]:
    """Shuffle, then give val its share of whole paragraphs, so no text is in both splits."""
    order = rng.permutation(len(paragraphs))
    n_val = min(len(paragraphs) - 1, max(1, round(len(paragraphs) * num_val / (num_train + num_val))))
    if n_val < 1:
        raise ValueError(f"the text corpus has {len(paragraphs)} usable paragraph(s); at least 2 are needed "
                         f"so that train and val hold different text")
    return {"val": [paragraphs[i] for i in order[:n_val]], "train": [paragraphs[i] for i in order[n_val:]]}


def _prepare_text(data_cfg: dict, out_dir: Path, *, seed: int, common: dict) -> dict:
    text_cfg = data_cfg["text"]
    corpus_name = text_cfg["corpus"] or f"pydoc_data.topics (Python {platform.python_version()})"
    paragraphs = load_corpus(text_cfg["corpus"], min_words=text_cfg["min_words"])
    font_path = resolve_font(text_cfg["font"])
    rng = np.random.default_rng(stage_seed(seed, "data", "text_split"))
    by_split = _split_paragraphs(paragraphs, num_train=data_cfg["num_train"], num_val=data_cfg["num_val"], rng=rng)
    render = {k: text_cfg[k] for k in ("font", "font_size", "margin", "line_spacing")}
    manifests = {}
    for split in SPLITS:
        texts, kinds = page_texts(by_split[split], data_cfg[f"num_{split}"], max_words=text_cfg["max_words"],
                                  min_words=text_cfg["min_words"], corpus=f"{corpus_name} ({split} part)")
        if kinds["word"]:
            log.warning("%s: the corpus is small for %d images, so %d pages start in mid-sentence",
                        split, len(texts), kinds["word"])
        split_dir = out_dir / split
        with SplitWriter(split_dir, capacity=len(texts), image_size=data_cfg["image_size"], with_text=True) as writer:
            batches = range(0, len(texts), _BATCH)
            for start in Progress(batches, total=len(batches), desc=f"render {split}", log_every=10):
                images, drawn = render_text_images(texts[start: start + _BATCH],
                                                   image_size=data_cfg["image_size"], **render)
                for image, text in zip(images, drawn):
                    writer.append(image, 0, text)
            manifests[split] = writer.commit({
                **common, "split": split, "num_classes": 0, "class_names": [], "skipped": 0,
                "corpus": corpus_name, "corpus_paragraphs": len(paragraphs),
                "split_paragraphs": len(by_split[split]), "page_starts": kinds,
                "font_file": font_path.name, "font_sha256": file_sha256(font_path),
            })
        log.info("wrote %d text images to %s", manifests[split]["num_images"], split_dir)
    return manifests


# --- image folder -----------------------------------------------------------------------------

def _decoded(jobs: list[tuple[str, int]], workers: int) -> Iterator[np.ndarray | str]:
    """Decoded images (or error messages) in the order of `jobs`, in `workers` processes when > 0.

    Files go to the workers in chunks of `_DECODE_CHUNK` (fewer round trips), with at
    most `workers * 4` chunks in flight, so memory stays flat however large the folder.
    A worker that dies (e.g. a spawned process cannot re-import the caller's main
    module) raises BrokenProcessPool instead of hanging.
    """
    if workers == 0:
        yield from map(try_load_image, jobs)
        return
    chunks = (jobs[i: i + _DECODE_CHUNK] for i in range(0, len(jobs), _DECODE_CHUNK))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = deque(pool.submit(try_load_images, chunk) for chunk in itertools.islice(chunks, workers * 4))
        while pending:
            results = pending.popleft().result()
            for chunk in itertools.islice(chunks, 1):
                pending.append(pool.submit(try_load_images, chunk))
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _prepare_image_folder(data_cfg: dict, out_dir: Path, *, seed: int, common: dict) -> dict:
    root = data_cfg["image_folder"]["root"]
    if not root:
        raise ValueError("data.image_folder.root: required when data.source is image_folder")
    classes, items = list_images(root)
    num_val, num_train = data_cfg["num_val"], data_cfg["num_train"]
    if len(items) <= num_val:
        raise ValueError(f"image folder {root}: {len(items)} image(s), but num_val is {num_val} and the "
                         f"train split needs at least one more; lower data.num_val")
    order = np.random.default_rng(stage_seed(seed, "data", "image_split")).permutation(len(items))
    shuffled = [items[i] for i in order]
    size = data_cfg["image_size"]
    skipped: list[str] = []

    def readable(decoded: Iterator[np.ndarray | str]) -> Iterator[tuple[np.ndarray, int]]:
        for result, (path, label) in zip(decoded, shuffled):
            if not isinstance(result, str):
                yield result, label
            elif data_cfg["skip_bad_images"]:
                log.warning("skipped %s", result)
                skipped.append(str(Path(path).relative_to(root)))
            else:
                raise BadImageError(result)

    # val takes the first num_val readable images of the shuffled list, train the next num_train
    want = {"val": num_val, "train": min(num_train, len(items) - num_val)}
    manifests = {}
    decoded = _decoded([(str(path), size) for path, _ in shuffled], data_cfg["workers"])
    try:
        stream = readable(decoded)
        for split in ("val", "train"):
            skipped_before = len(skipped)
            with SplitWriter(out_dir / split, capacity=want[split], image_size=size, with_text=False) as writer:
                taken = itertools.islice(stream, want[split])
                for image, label in Progress(taken, total=want[split], desc=f"import {split}", log_every=500):
                    writer.append(image, label)
                split_skipped = skipped[skipped_before:]
                if split_skipped:
                    log.warning("%s: skipped %d unreadable image(s)", split, len(split_skipped))
                manifests[split] = writer.commit({
                    **common, "split": split, "num_classes": len(classes), "class_names": classes,
                    "skipped": len(split_skipped), "skipped_files": split_skipped, "root_images": len(items),
                })
    finally:
        decoded.close()
    return manifests


# --- scikit-image sample photographs ------------------------------------------------------------

def _prepare_skimage(data_cfg: dict, out_dir: Path, *, seed: int, common: dict) -> dict:
    import skimage

    names, photos = load_photos()
    size = data_cfg["image_size"]
    manifests = {}
    for split in SPLITS:
        n = data_cfg[f"num_{split}"]
        rng = np.random.default_rng(stage_seed(seed, "data", "skimage", split))
        labels = balanced_labels(n, len(photos), rng)
        with SplitWriter(out_dir / split, capacity=n, image_size=size, with_text=False) as writer:
            for start in Progress(range(0, n, _BATCH), total=math.ceil(n / _BATCH), desc=f"crop {split}",
                                  log_every=10):
                crops = random_crops(photos, labels[start: start + _BATCH], image_size=size, rng=rng)
                for image, label in zip(crops, labels[start: start + _BATCH]):
                    writer.append(image, label)
            manifests[split] = writer.commit({
                **common, "split": split, "num_classes": len(photos), "class_names": names, "skipped": 0,
                "skimage_version": skimage.__version__,
            })
    return manifests
