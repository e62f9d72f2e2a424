"""Speed of the evaluation metrics: seconds per 1,000 images for Inception features (FID/KID/PR)
and for easyocr (rOCR / PPL-OCR), at the image sizes of the experiments.

Measured on a few dozen images after a warm-up (model loading and the one-time weight
conversion are not counted) and scaled to 1,000. Feature speed does not depend on the
content (every image is resized to 299 px), so random images are used; OCR speed does
(one recognition per detected line), so OCR reads pages rendered by the project's
own text renderer (pydoc_data.topics prose, DejaVu Sans), and the table also gives the
ROUGE-L it reached against the drawn text.

    python benchmarks/bench_metrics.py [--device auto] [--fid-images 32] [--ocr-images 12] [--out rows.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import hardware_table, print_and_save  # also puts the repo on sys.path
from dnd.data.text import load_corpus, page_texts, render_text_images
from dnd.metrics.fid import extract_features
from dnd.metrics.ocr import ocr_scores
from dnd.runtime import resolve_device, synchronize


def row(metric: str, size: int, n: int, seconds: float, cpu_seconds: float, rouge_l: float | None = None) -> dict:
    # CPU seconds (all threads of this process) say what the work costs when other jobs share the cores.
    return {"metric": metric, "input px": size, "images": n, "s per 1,000 images": 1000 * seconds / n,
            "CPU s per 1,000 images": 1000 * cpu_seconds / n,
            "ROUGE-L": "" if rouge_l is None else f"{rouge_l:.3f}"}


def fid_rows(sizes: list[int], n: int, batch_size: int, device) -> list[dict]:
    rng = np.random.default_rng(0)
    extract_features(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), device=device)  # load + warm up
    rows = []
    for size in sizes:
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        extract_features(images, batch_size=batch_size, device=device)
        synchronize(device)
        rows.append(row("Inception features (FID/KID/PR)", size, n, time.perf_counter() - start,
                        time.process_time() - cpu_start))
    return rows


def ocr_rows(sizes: list[int], n: int, font_size: int, device) -> list[dict]:
    gpu = device.type == "cuda"
    texts, _ = page_texts(load_corpus(None, min_words=3), n, max_words=100, min_words=3)
    rows = []
    for size in sizes:
        images, drawn = render_text_images(texts, image_size=size, font="DejaVuSans.ttf", font_size=font_size,
                                           margin=4, line_spacing=1.15)
        ocr_scores(images[:1], gpu=gpu)  # load the reader + warm up
        start, cpu_start = time.perf_counter(), time.process_time()
        table = ocr_scores(images, drawn, gpu=gpu)
        rows.append(row(f"easyocr ({font_size} px text)", size, n, time.perf_counter() - start,
                        time.process_time() - cpu_start, rouge_l=table["rouge_l"].mean()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="input sizes in px (default: 64 128)")
    parser.add_argument("--fid-images", type=int, default=32, help="images timed per size for features (default: 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="feature batch size (default: 32)")
    parser.add_argument("--ocr-images", type=int, default=12, help="pages timed per size for OCR (default: 12)")
    parser.add_argument("--font-size", type=int, default=12, help="text size of the OCR pages in px (default: 12)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows to a .json or .csv file")
    args = parser.parse_args()

    device = resolve_device(args.device)
    rows = fid_rows(args.sizes, args.fid_images, args.batch_size, device)
    rows += ocr_rows(args.sizes, args.ocr_images, args.font_size, device)
    print(hardware_table(device))
    print()
    print_and_save(rows, device, args.out)


if __name__ == "__main__":
    main()
