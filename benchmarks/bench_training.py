"""Training speed of the three generators at an equal backbone: the real `TrainStep` on random codes.

Prints the hardware, then one row per generator kind: ms per optimizer step, images/s,
codes/s (B x positions x depth per second), the FLOPs of one step (counted with
torch's FlopCounterMode on the eager forward + backward), achieved TFLOP/s, peak
memory, and on a GPU with known peaks the roofline floor of the step and how far
above it the measurement is. Floor = max(FLOPs / peak, bytes / bandwidth), bytes =
40 B per parameter (AdamW and EMA read and write fp32 weights, grads, two moments).

    python benchmarks/bench_training.py                       # tiny, CPU-sized default (~1 min)
    python benchmarks/bench_training.py --size XXL --batch 32 --depth 2 --kind dnd --compile   # on a GPU
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import (KIND_LABELS, add_generator_arguments, add_peak_arguments, count_params,
                    floor_seconds, peak_memory_mib, print_rows, reset_peak_memory, start_generator_run)
from dnd.generators.speed import random_generator
from dnd.generators.train import TrainStep
from dnd.runtime import synchronize

OPTIMIZER_BYTES_PER_PARAM = 40


def step_flops(model, codes, cond, device) -> float:
    """FLOPs of one forward + backward (eager, autocast as in training)."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(codes, cond)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_kind(kind: str, args, device: torch.device, peaks) -> dict:
    torch.manual_seed(0)
    model = random_generator(kind, args.size, depth=args.depth, grid=args.grid, codebook_size=args.codebook_size,
                             num_classes=args.classes, device=device).train()
    for stack in model.modules():
        if hasattr(stack, "activation_checkpointing"):
            stack.activation_checkpointing = args.activation_checkpointing
    L = args.grid * args.grid
    codes = torch.randint(0, args.codebook_size, (args.batch, L, args.depth), device=device)  # (B, L, D)
    cond = torch.randint(0, args.classes, (args.batch,), device=device) if args.classes else None
    flops = step_flops(model, codes, cond, device)
    step = TrainStep(model, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05, grad_clip=1.0, ema_decay=0.999,
                     compile=args.compile, device=device)
    for _ in range(args.warmup):  # compile, allocator and autotuning warm-up
        step([(codes, cond)], 3e-4)
    synchronize(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses = step([(codes, cond)], 3e-4)
    synchronize(device)
    seconds = (time.perf_counter() - t0) / args.steps
    if not torch.isfinite(losses).all():
        raise RuntimeError(f"{kind}: non-finite loss in the benchmark")
    params = count_params(model)
    floor = floor_seconds(OPTIMIZER_BYTES_PER_PARAM * params, flops, peaks)
    row = {"kind": KIND_LABELS[kind], "size": args.size,
           "depth": args.depth, "batch": args.batch, "params (M)": params / 1e6, "ms/step": 1000 * seconds,
           "images/s": args.batch / seconds, "codes/s": args.batch * L * args.depth / seconds,
           "GFLOP/step": flops / 1e9, "TFLOP/s": flops / seconds / 1e12, "peak MiB": peak_memory_mib(device)}
    if floor is not None:
        row["floor ms"] = 1000 * floor
        row["x floor"] = seconds / floor
        row["% of peak FLOP/s"] = 100 * flops / seconds / peaks[1]
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generator_arguments(p)
    p.add_argument("--batch", type=int, default=8, help="code sequences per optimizer step")
    p.add_argument("--depth", type=int, default=2, help="code depth D")
    p.add_argument("--classes", type=int, default=1000, help="class labels (0 = unconditional)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile)")
    p.add_argument("--activation-checkpointing", action="store_true")
    add_peak_arguments(p)
    args = p.parse_args(argv)
    device, peaks = start_generator_run(args)
    rows = [bench_kind(kind, args, device, peaks) for kind in args.kind]
    print_rows(rows, device, peaks, args.out)
    return rows


if __name__ == "__main__":
    main()
