"""Sampling speed of the three generators: images/s, ms per decode step, peak memory, the roofline floor.

Random weights, class-conditional with classifier-free guidance (one batched forward
over [cond; null]), temperature 1. Each configuration runs on the plain decode path
(eager steps over the filled cache prefix) and/or the fast one (`generate(compile=True)`:
static-shape steps under torch.compile, captured as CUDA graphs on a GPU). Compilation
happens in the untimed warm-up call.

A decode step is one forward of the model: DnD and RQ-Transformer take grid^2 steps
(RQ-Transformer adds D depth-transformer steps inside each), the flattened 1-D AR takes
grid^2 x D. Floor = max(FLOPs / peak, bytes / bandwidth) over the whole batch: FLOPs
counted with FlopCounterMode on one plain run; bytes = bf16 weights read once per step
(of the parts of the model that step uses) + the K/V prefix read by every attention
layer at every step.

    python benchmarks/bench_sampling.py                         # tiny, CPU-sized default
    python benchmarks/bench_sampling.py --depth-sweep --out results/depth_sweep.json --plot depth_sweep.png
    python benchmarks/bench_sampling.py --size XXL --batch 250 --kind dnd --paths fast   # on a GPU
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import (KIND_LABELS, add_generator_arguments, add_peak_arguments, count_params, floor_seconds,
                    markdown_table, peak_memory_mib, print_rows, start_generator_run)
from dnd.generators import Sampler
from dnd.generators.speed import random_generator, time_generation

SWEEP_DEPTHS = (1, 2, 4, 8)


def decode_bytes(model, batch_rows: int, weight_bytes: int) -> float:
    """Bytes one plain-path generation must move: weights per step + K/V prefixes (see the module doc)."""
    L, D = model.seq_len, model.depth
    gathers = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}

    def matmul_params(module) -> int:
        return sum(p.numel() for p in module.parameters() if id(p) not in gathers)

    kv_row = 2 * model.dim * weight_bytes * batch_rows  # keys + values of one position, one layer
    if hasattr(model, "depth_stack"):  # RQ-Transformer: spatial steps, then D depth steps per position
        spatial = matmul_params(model.spatial) + matmul_params(model.context_norm)
        per_depth = matmul_params(model.depth_stack) + matmul_params(model.head)
        weights = L * spatial + L * D * per_depth
        kv = kv_row * (len(model.spatial) * L * (L + 1) / 2 + len(model.depth_stack) * L * D * (D + 1) / 2)
    else:
        steps = model.num_steps
        weights = steps * matmul_params(model)
        kv = kv_row * len(model.layers) * steps * (steps + 1) / 2
    return weights * weight_bytes + kv


_FLOPS: dict[tuple, float] = {}


def generation_flops(model, cond, sampler) -> float:
    """FLOPs of one generate call, counted once per configuration (the paths share it; an
    XXL count runs a whole generation under the counter)."""
    key = (json.dumps(model.model_args, sort_keys=True), None if cond is None else tuple(cond.shape), sampler.cfg_scale)
    if key not in _FLOPS:
        with FlopCounterMode(display=False) as counter:
            model.generate(cond, sampler=sampler, generator=torch.Generator(model.device.type).manual_seed(0))
        _FLOPS[key] = float(counter.get_total_flops())
    return _FLOPS[key]


def bench_one(kind: str, depth: int, path: str, args, device: torch.device, peaks) -> dict:
    torch.manual_seed(0)
    model = random_generator(kind, args.size, depth=depth, grid=args.grid, codebook_size=args.codebook_size,
                             num_classes=args.classes, device=device)
    if device.type == "cuda":  # bf16 weights, as the sample stage loads them on a GPU (generators.load)
        model = model.to(torch.bfloat16)
    sampler = Sampler(temperature=1.0, cfg_scale=args.cfg_scale)
    seconds = time_generation(model, batch=args.batch, sampler=sampler, compile=path == "fast",
                              repeats=args.repeats, warmup=args.warmup)
    guided = args.classes > 0 and args.cfg_scale != 1.0
    row = {"kind": KIND_LABELS[kind], "path": path, "size": args.size,
           "depth": depth, "batch": args.batch, "params (M)": count_params(model) / 1e6,
           "steps": model.num_steps, "images/s": args.batch / seconds,
           "ms/step": 1000 * seconds / model.num_steps, "peak MiB": peak_memory_mib(device)}
    if peaks is not None:
        cond = torch.zeros(args.batch, dtype=torch.long, device=device) if args.classes else None
        flops = generation_flops(model, cond, sampler)
        weight_bytes = 2 if device.type == "cuda" else 4
        floor = floor_seconds(decode_bytes(model, args.batch * (2 if guided else 1), weight_bytes), flops, peaks)
        row.update({"floor ms/step": 1000 * floor / model.num_steps, "x floor": seconds / floor})
    return row


def plot_sweep(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dnd.checkpoint import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (kind, p) in dict.fromkeys((r["kind"], r["path"]) for r in rows):
        sel = [r for r in rows if r["kind"] == kind and r["path"] == p]
        ax.plot([r["depth"] for r in sel], [r["images/s"] for r in sel], marker="o", label=f"{kind} ({p})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(SWEEP_DEPTHS), [str(d) for d in SWEEP_DEPTHS])
    ax.set_xlabel("code depth D")
    ax.set_ylabel("images / s")
    ax.set_title(f"sampling cost of depth ({rows[0]['size']}, batch {rows[0]['batch']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=str(path).rsplit(".", 1)[-1])
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generator_arguments(p)
    p.add_argument("--batch", type=int, default=8, help="images per generate call")
    p.add_argument("--depth", type=int, default=2, help="code depth D (ignored with --depth-sweep)")
    p.add_argument("--depth-sweep", action="store_true",
                   help=f"every kind at D = {', '.join(map(str, SWEEP_DEPTHS))} with the same backbone")
    p.add_argument("--classes", type=int, default=1000, help="class labels (0 = unconditional, no guidance)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance (1 = none)")
    p.add_argument("--paths", nargs="+", default=None, choices=["plain", "fast"],
                   help="decode paths: plain (eager) and/or fast (static shapes under torch.compile: CUDA graphs "
                        "on a GPU, inductor C++ on the CPU, about a minute to compile per model there); default: "
                        "plain on the CPU; on a GPU both, or only fast with --depth-sweep")
    p.add_argument("--repeats", type=int, default=1, help="timed generate calls (the mean is reported)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed generate calls first (default: 1 for the fast path or on a GPU, for compilation, "
                        "graph capture and first-call set-up; 0 for the plain path on the CPU)")
    p.add_argument("--plot", default=None, help="with --depth-sweep: save images/s against D (.png, .pdf, .svg)")
    add_peak_arguments(p)
    args = p.parse_args(argv)
    if args.plot and not args.depth_sweep:
        p.error("--plot needs --depth-sweep")
    device, peaks = start_generator_run(args)
    depths = SWEEP_DEPTHS if args.depth_sweep else (args.depth,)
    if args.paths is None:
        args.paths = ["plain"] if device.type != "cuda" else ["fast"] if args.depth_sweep else ["plain", "fast"]
    rows = []
    for kind in args.kind:
        for depth in depths:
            for path in args.paths:
                rows.append(bench_one(kind, depth, path, args, device, peaks))
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print_rows(rows, device, peaks, args.out)
    if args.plot:
        plot_sweep(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
