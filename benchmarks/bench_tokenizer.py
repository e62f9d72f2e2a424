"""Tokenizer speed: training images/s and code-extraction images/s, per experiment size.

For each experiment file (default: the smoke size, 64 px, and the text-small size, 128 px)
the named tokenizer variant is built from its config: training runs the real
`TokenizerTrainer.step` (forward, losses, backward, optimizer, codebook EMA) on random
images, extraction runs the real `extract_codes` stage (eval-mode encode, int16 shards,
concatenation) on a temporary split of random images. Prints the hardware, then a
markdown table.

    python benchmarks/bench_tokenizer.py                          # small default run (< 1 min on 2 cores)
    python benchmarks/bench_tokenizer.py --steps 20 --batch 32 --extract-images 1024 --ten-crop
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import hardware_table, peak_memory_mib, print_and_save, reset_peak_memory
from dnd.checkpoint import save_checkpoint
from dnd.codes import extract_codes
from dnd.config import load
from dnd.data.shards import SplitWriter
from dnd.runtime import resolve_device, synchronize
from dnd.tokenizer.train import TokenizerTrainer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPERIMENTS = [ROOT / "experiments" / "smoke.yaml", ROOT / "experiments" / "text-small.yaml"]


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def bench_training(trainer: TokenizerTrainer, images: np.ndarray, steps: int, warmup: int) -> float:
    for step in range(warmup):
        trainer.step(images, step)
    synchronize(trainer.device)
    t0 = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer.step(images, step)
    synchronize(trainer.device)
    return steps * len(images) / (time.perf_counter() - t0)


def bench_extraction(trainer: TokenizerTrainer, cfg: dict, n: int, *, ten_crop: bool, batch: int, device) -> float:
    size = trainer.model.image_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = tmp / "model.pt"
        save_checkpoint({"config": cfg, "model_args": trainer.model.model_args,
                         "model": trainer.model.state_dict(), "step": 0}, model_path)
        with SplitWriter(tmp / "split", capacity=n, image_size=size, with_text=False) as writer:
            for image in random_images(n, size, seed=1):
                writer.append(image, 0)
            writer.commit({"source": "benchmark"})
        t0 = time.perf_counter()
        extract_codes(model_path, tmp / "split", tmp / "codes", ten_crop=ten_crop, batch_size=batch,
                      shard_size=max(1, n // 2), device=device)
        return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", type=Path, default=DEFAULT_EXPERIMENTS,
                        help="experiment YAML files; one row per file (default: smoke and text-small)")
    parser.add_argument("--tokenizer", default="d4", help="tokenizer variant name in each file (default d4)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first (default 1)")
    parser.add_argument("--batch", type=int, default=4, help="training batch size (default 4; the config's is ignored)")
    parser.add_argument("--extract-images", type=int, default=16, help="images to extract codes from (default 16)")
    parser.add_argument("--extract-batch", type=int, default=64, help="views per extraction forward pass")
    parser.add_argument("--ten-crop", action="store_true", help="also time extraction with ten-crop (10 views)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="also save the rows as .json or .csv")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(hardware_table(device))
    print()
    rows = []
    for path in args.experiments:
        cfg = load(path)
        if args.tokenizer not in cfg["tokenizers"]:
            parser.error(f"{path}: no tokenizer {args.tokenizer!r}; defined: {sorted(cfg['tokenizers'])}")
        tok = cfg["tokenizers"][args.tokenizer]
        size = cfg["data"]["image_size"]
        torch.manual_seed(0)
        trainer = TokenizerTrainer(tok, size, device)
        reset_peak_memory(device)
        train_ips = bench_training(trainer, random_images(args.batch, size), args.steps, args.warmup)
        row = {"experiment": path.stem, "image px": size, "grid": f"{trainer.model.grid}x{trainer.model.grid}",
               "depth": trainer.model.depth, "params M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
               "batch": args.batch, "train img/s": train_ips,
               "extract img/s": bench_extraction(trainer, cfg, args.extract_images, ten_crop=False,
                                                 batch=args.extract_batch, device=device)}
        if args.ten_crop:
            row["extract img/s (ten-crop)"] = bench_extraction(trainer, cfg, args.extract_images, ten_crop=True,
                                                               batch=args.extract_batch, device=device)
        row["peak MiB"] = peak_memory_mib(device)
        rows.append(row)
        print(f"done: {path.stem}", flush=True)
    print()
    print_and_save(rows, device, args.out)


if __name__ == "__main__":
    main()
