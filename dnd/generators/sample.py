"""The `sample` stage: generate codes with a trained generator (EMA weights), decode them to images.

Labels cycle through 0..num_classes-1 for a class-conditional model (so every class
gets the same number of samples, give or take one); an unconditional model gets
label -1. Batch i draws from its own `torch.Generator` seeded from (sampler `seed`, i),
so the same checkpoint, settings and device give the same codes, and a killed job
resumes from its last finished batch (kept under `out_dir/batches/`, removed at the
end) with the same result as an uninterrupted run. Generation and
tokenizer decoding are timed separately (with a device sync around each), because
the generator's speed is what the paper's efficiency claim is about.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dnd import generators
from dnd.checkpoint import atomic_path, save_json, save_npy
from dnd.data.shards import file_sha256
from dnd.images import make_grid, save_png, to_uint8
from dnd.progress import Progress
from dnd.runtime import stage_seed, synchronize
from dnd.tracking import NullTracker

GRID_IMAGES = 36


def sampler_from_config(sampler_cfg: dict) -> "generators.Sampler":
    return generators.Sampler(temperature=sampler_cfg["temperature"], top_k=sampler_cfg["top_k"],
                              top_p=sampler_cfg["top_p"], cfg_scale=sampler_cfg["cfg_scale"])


def sample_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """int64 (N,): 0, 1, ..., C-1, 0, 1, ... for a class-conditional model, -1 (no label) otherwise."""
    if num_classes > 0:
        return np.arange(num_samples, dtype=np.int64) % num_classes
    return np.full(num_samples, -1, np.int64)


def sample(gen_path: Path, tokenizer_path: Path, sampler_cfg: dict, out_dir: Path, *, device,
           tracker=None) -> dict:
    """Write codes.npy (int16 (N, L, D)), labels.npy, images.npy (uint8 (N, H, W, 3)), grid.png, timing.json.

    Returns the timing dict: seconds (whole stage), generate_seconds, decode_seconds,
    images_per_s and ms_per_step (generation only; a step is one forward pass of the
    model over the batch: grid^2 per image, grid^2 * D for the flattened 1-D AR),
    num_samples, batch_size, device.
    """
    from dnd.tokenizer import load as load_tokenizer

    tracker = tracker or NullTracker()
    device = torch.device(device)
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    # bf16 weights on a GPU (see generators.load); the CPU keeps fp32, its bf16 matmuls are slower.
    model = generators.load(gen_path, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    tokenizer = load_tokenizer(tokenizer_path, map_location=device)
    args = model.model_args
    grid, depth, num_classes = args["grid"], args["depth"], args["num_classes"]
    n, batch_size = sampler_cfg["num_samples"], sampler_cfg["batch_size"]
    labels = sample_labels(n, num_classes)
    sampler = sampler_from_config(sampler_cfg)

    # Finished batches from a killed run are reused only if made by this model and these settings.
    batch_dir = out_dir / "batches"
    identity = {"generator_sha256": file_sha256(gen_path), "tokenizer_sha256": file_sha256(tokenizer_path),
                "sampler": sampler_cfg, "device": device.type}
    meta = batch_dir / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()) != identity:
        print(f"sample: {batch_dir} was made by another model or settings; starting over")
        shutil.rmtree(batch_dir)
    save_json(identity, meta)

    all_codes, all_images = [], []
    generate_s = decode_s = 0.0
    batches = range(0, n, batch_size)
    resumed = sum((batch_dir / f"{i:06d}.npz").is_file() for i in range(len(batches)))
    if resumed:
        print(f"sample: resuming, {resumed} of {len(batches)} batches already done in {batch_dir}")
    progress = Progress(batches, total=len(batches), desc="sample", log_every=1)
    for i, start in enumerate(progress):
        b = min(batch_size, n - start)
        path = batch_dir / f"{i:06d}.npz"
        if not path.is_file():
            rng = torch.Generator(device=device).manual_seed(stage_seed(sampler_cfg["seed"], "batch", str(i)))
            cond = torch.from_numpy(labels[start:start + b]).to(device) if num_classes > 0 else None
            synchronize(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                codes = model.generate(cond, batch_size=b, sampler=sampler, generator=rng,
                                       compile=sampler_cfg.get("compile", False))  # (b, L, D)
            synchronize(device)
            t1 = time.perf_counter()
            with torch.inference_mode():  # the tokenizer decodes in fp32
                x = tokenizer.decode_codes(codes.reshape(b, grid, grid, depth))  # (b, 3, H, W) in [-1, 1]
                images = to_uint8(x)
            t2 = time.perf_counter()
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, codes=codes.cpu().numpy().astype(np.int16), images=images,
                             seconds=np.array([t1 - t0, t2 - t1]))
        batch = np.load(path)
        generate_s, decode_s = generate_s + float(batch["seconds"][0]), decode_s + float(batch["seconds"][1])
        all_codes.append(batch["codes"])
        all_images.append(batch["images"])
        progress.set(images_per_s=(start + b) / max(generate_s, 1e-9))

    codes_np, images_np = np.concatenate(all_codes), np.concatenate(all_images)
    save_npy(codes_np, out_dir / "codes.npy")
    save_npy(labels, out_dir / "labels.npy")
    save_npy(images_np, out_dir / "images.npy")
    save_png(make_grid(images_np[:GRID_IMAGES]), out_dir / "grid.png")
    timing = {
        "seconds": time.perf_counter() - t_start,
        "generate_seconds": generate_s,
        "decode_seconds": decode_s,
        "images_per_s": n / generate_s,
        "ms_per_step": 1000.0 * generate_s / (len(batches) * model.num_steps),
        "num_samples": n,
        "batch_size": batch_size,
        "device": str(device),
        "resumed_batches": resumed,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    save_json(timing, out_dir / "timing.json")  # written last: its presence means the folder is complete
    shutil.rmtree(batch_dir)
    tracker.log_metrics({k: v for k, v in timing.items() if isinstance(v, (int, float))})
    tracker.log_artifact(out_dir / "grid.png")
    return timing
