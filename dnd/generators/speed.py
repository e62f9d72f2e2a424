"""Sampling speed of random-weight generators, and the cost of code depth (the `depth_cost` stage).

How fast a model samples depends on its architecture, the batch and the device, not on
its weights, so speed is measured on randomly initialised models: every generator kind
at every code depth on one backbone, the measurement the DnD paper never published.
DnD takes one forward pass per position whatever D; the flattened 1-D AR takes D per
position; the RQ-Transformer adds D depth-transformer steps per position.
`benchmarks/bench_sampling.py` times the same way and adds the roofline floor.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from dnd import generators
from dnd.checkpoint import save_json
from dnd.config import depth_cost_plan
from dnd.progress import Progress
from dnd.runtime import synchronize
from dnd.tracking import NullTracker


def random_generator(kind: str, size: str, *, depth: int, grid: int, codebook_size: int, num_classes: int,
                     device: torch.device, **overrides) -> generators.CodeGenerator:
    """A randomly initialised generator in eval mode; "ar1d" is the flattened 1-D AR (one code per step)."""
    if kind == "ar1d":
        overrides["flatten"] = True
    with device:  # initialised where it runs: an XXL model takes tens of seconds to initialise on a CPU
        model = generators.build(kind, size, depth=depth, codebook_size=codebook_size, grid=grid,
                                 num_classes=num_classes, **overrides)
    with torch.no_grad():  # zero-initialised heads give uniform logits; trained weights do not
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.02)
    return model.to(device).eval()


def time_generation(model, *, batch: int, sampler: generators.Sampler, compile: bool, repeats: int = 1,
                    warmup: int | None = None, seed: int = 0) -> float:
    """Mean wall seconds of one `model.generate` call over `batch` images, after untimed warm-up calls.

    warmup None: one call when compiling (compilation, CUDA-graph capture) or on a GPU
    (first-call set-up), none otherwise. Peak CUDA memory is reset before the timed calls.
    """
    device = model.device
    classes = model.model_args["num_classes"]
    cond = torch.randint(0, classes, (batch,), device=device,
                         generator=torch.Generator(device.type).manual_seed(seed)) if classes else None

    def run(call: int) -> None:
        rng = torch.Generator(device.type).manual_seed(seed + call)
        with torch.inference_mode():
            model.generate(cond, batch_size=batch, sampler=sampler, generator=rng, compile=compile)

    for w in range(int(compile or device.type == "cuda") if warmup is None else warmup):
        run(w)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for r in range(repeats):
        run(100 + r)
    synchronize(device)
    return (time.perf_counter() - t0) / repeats


def depth_cost(cfg: dict, out: Path, *, num_classes: int, device: torch.device, tracker=None) -> dict:
    """Time every kind at every depth of `evaluate.depth_cost`; write and return the result.

    out: JSON with the plan, the device, and one row per (kind, depth): decode steps,
    parameters, images/s and ms per decode step (a step is one forward pass over the batch).
    """
    from dnd.generators.sample import sampler_from_config

    tracker = tracker or NullTracker()
    plan = depth_cost_plan(cfg)
    path = plan["path"] if plan["path"] != "auto" else "fast" if device.type == "cuda" else "plain"
    # Per-depth lists cannot follow the swept depth; their first value stands for all (speed barely depends on it).
    sampler = sampler_from_config({k: v[0] if isinstance(v, list) else v for k, v in plan["sampling"].items()})
    configs = [(kind, depth) for kind in plan["kinds"] for depth in plan["depths"]]
    rows = []
    progress = Progress(configs, total=len(configs), desc="depth_cost", log_every=1)
    for kind, depth in progress:
        torch.manual_seed(0)
        options = dict(plan["overrides"], **({"depth_layers": plan["depth_layers"]} if kind == "rqt" else {}))
        model = random_generator(kind, plan["size"], depth=depth, grid=plan["grid"],
                                 codebook_size=plan["codebook_size"], num_classes=num_classes, device=device,
                                 **options)
        if device.type == "cuda":  # bf16 weights, as the sample stage loads them on a GPU
            model = model.to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            seconds = time_generation(model, batch=plan["batch_size"], sampler=sampler, compile=path == "fast",
                                      repeats=plan["repeats"])
        row = {"kind": kind, "depth": depth, "steps": model.num_steps,
               "params": sum(p.numel() for p in model.parameters()),
               "images_per_s": plan["batch_size"] / seconds, "ms_per_step": 1000 * seconds / model.num_steps}
        rows.append(row)
        progress.set(kind=kind, depth=depth, images_per_s=row["images_per_s"])
        tracker.log_metrics({f"images_per_s.{kind}.d{depth}": row["images_per_s"],
                             f"ms_per_step.{kind}.d{depth}": row["ms_per_step"]})
        del model
    result = {"plan": {**plan, "path": path, "num_classes": num_classes,
                       "guided": num_classes > 0 and sampler.cfg_scale != 1.0},
              "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch_threads": torch.get_num_threads(), "rows": rows}
    save_json(result, out)
    return result
