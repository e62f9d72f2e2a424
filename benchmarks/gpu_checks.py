"""Every check that needs a GPU, as one prepared command for a lent device session (issue 7).

    python benchmarks/gpu_checks.py --out DIR            # on the GPU machine, about 9 minutes
    python benchmarks/gpu_checks.py --out DIR --smoke    # the same steps at tiny sizes on the CPU

Each step runs in its own process under its own time limit, most valuable first, and
DIR/summary.md and DIR/results.json are rewritten after every step, so a session cut
short keeps what finished (everything lands in 3 files plus the plot: the device tool
returns at most 8):
  correctness  bf16 weights on the device: greedy decoding against the teacher-forced
               argmax, and the static and compiled (CUDA-graph) paths against the eager
               one, seeded sampling included, for every generator kind
  sample-b250  DnD-XXL, 16x16x2 codes, guidance 2, batch 250, plain and fast paths
               (issue-7 target: >= 250 images/s, within 2.5x of the floor)
  sample-b50   the same at batch 50 (target: >= 100 images/s)
  train-b32    DnD-XXL training at batch 32, eager and compiled (>= 200 images/s, >= 55% of peak)
  depth-sweep  sampling images/s of every kind at D = 1, 2, 4, 8, B size, fast path, batch 50

The device machine's Python (3.12) has torch but not jsonschema, which dnd.config
imports: `make gpu-wheels` downloads those wheels into .whl/ here; the device command
then carries .whl and starts with the pip line in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (name, seconds allowed, arguments of a benchmark script or None for the in-process check)
# on a GPU; --smoke swaps in tiny sizes that run on a 2-core CPU in about a minute.
STEPS = [
    ("correctness", 150, None),
    ("sample-b250", 240, ["bench_sampling.py", "--kind", "dnd", "--size", "XXL", "--depth", "2", "--batch", "250",
                          "--cfg-scale", "2", "--paths", "plain", "fast", "--repeats", "2"]),
    ("sample-b50", 180, ["bench_sampling.py", "--kind", "dnd", "--size", "XXL", "--depth", "2", "--batch", "50",
                         "--cfg-scale", "2", "--paths", "plain", "fast", "--repeats", "3"]),
    ("train-b32", 100, ["bench_training.py", "--kind", "dnd", "--size", "XXL", "--depth", "2", "--batch", "32",
                        "--steps", "5"]),
    ("train-b32-compiled", 130, ["bench_training.py", "--kind", "dnd", "--size", "XXL", "--depth", "2",
                                 "--batch", "32", "--steps", "5", "--compile"]),
    ("depth-sweep", 200, ["bench_sampling.py", "--size", "B", "--batch", "50", "--depth-sweep", "--paths", "fast"]),
]
SMOKE_ARGS = {"--size": "tiny", "--batch": "4", "--grid": "4", "--codebook-size": "64"}


def smoke_args(args: list[str]) -> list[str]:
    """A step's arguments at tiny sizes, plain path only (CPU compilation takes minutes)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a in SMOKE_ARGS:
            out += [a, SMOKE_ARGS[a]]
            i += 2
        elif a == "--paths":
            out += ["--paths", "plain"]
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                i += 1
        elif a == "--compile":
            i += 1
        else:
            out.append(a)
            i += 1
    if "--grid" not in out:
        out += ["--grid", SMOKE_ARGS["--grid"], "--codebook-size", SMOKE_ARGS["--codebook-size"]]
    return out


def agreement(a, b) -> float:
    return float((a == b).float().mean())


def check_correctness(device_name: str, smoke: bool) -> list[dict]:
    """Agreement fractions on the device; the step fails if any is below 0.95.

    Exact equality, what the CPU tests assert in fp32, is not expected here: bf16 kernels
    for one position (decoding) and for the whole sequence (teacher forcing) round
    differently, so near-tied codes may flip.
    """
    import torch

    from dnd import generators as G
    from dnd.generators.sampling import Sampler
    from dnd.runtime import resolve_device

    device = resolve_device(device_name)
    on_cuda = device.type == "cuda"
    classes, grid, vocab = 10, 4, 64
    rows = []
    for kind, options in [("dnd", {}), ("ar1d", {"flatten": True}), ("rqt", {})]:
        torch.manual_seed(0)
        model = G.build(kind, "tiny" if smoke else "small", depth=2, codebook_size=vocab, grid=grid,
                        num_classes=classes, **options)
        with torch.no_grad():  # separated logits, as in tests/test_generators.py
            for p in model.parameters():
                p.normal_(0.0, 0.3) if p.dim() > 1 else p.normal_(1.0, 0.3)
        model = model.to(device=device, dtype=torch.bfloat16 if on_cuda else None).eval()
        cond = torch.arange(8, device=device) % classes

        def generate(sampler, seed=0, **paths):
            rng = torch.Generator(device.type).manual_seed(seed)
            return model.generate(cond, sampler=sampler, generator=rng, **paths)

        greedy = generate(Sampler(temperature=0))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            forced = model(greedy, cond)[0].argmax(-1)
        row = {"kind": kind, "greedy == teacher-forced": agreement(greedy, forced),
               "static == eager (greedy)": agreement(generate(Sampler(temperature=0), static=True), greedy)}
        sampler = Sampler(temperature=1.0, top_k=16, cfg_scale=2.0)
        eager = generate(sampler, seed=1)
        row["static == eager (sampled)"] = agreement(generate(sampler, seed=1, static=True), eager)
        if not smoke:  # compiled: CUDA graphs on a GPU; minutes of inductor on a CPU
            row["compiled == eager (greedy)"] = agreement(generate(Sampler(temperature=0), compile=True), greedy)
            row["compiled == eager (sampled)"] = agreement(generate(sampler, seed=1, compile=True), eager)
        rows.append(row)
    worst = min(v for r in rows for v in r.values() if isinstance(v, float))
    if worst < 0.95:
        raise SystemExit(f"correctness: agreement {worst:.3f} < 0.95: {json.dumps(rows)}")
    return rows


def run_step(name: str, limit: float, script: list[str] | None, args, log) -> dict:
    """One step in its own process -> {"status", "seconds", "rows"}; never raises."""
    rows_path = Path(args.out) / f".{name}.json"
    if script is None:
        cmd = [sys.executable, __file__, "--out", str(args.out), "--device", args.device, "--only-correctness",
               str(rows_path)] + (["--smoke"] if args.smoke else [])
    else:
        step_args = smoke_args(script[1:]) if args.smoke else script[1:]
        cmd = [sys.executable, str(HERE / script[0]), *step_args, "--device", args.device, "--out", str(rows_path)]
    log.write(f"\n## {name}: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit:.0f} s"
    result = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd[1:])}
    if status == "ok" and rows_path.is_file():
        result["rows"] = json.loads(rows_path.read_text())["rows"]
        rows_path.unlink()
    return result


def write_summary(results: dict, out: Path) -> None:
    from common import hardware_table, markdown_table

    from dnd.checkpoint import save_json, save_text
    from dnd.runtime import resolve_device

    save_json(results, out / "results.json")
    parts = ["# GPU checks (benchmarks/gpu_checks.py)\n", hardware_table(resolve_device(results["device"])), ""]
    for name, r in results["steps"].items():
        parts += [f"## {name}: {r['status']} ({r['seconds']} s)\n", f"`{r['command']}`\n"]
        if r.get("rows"):
            parts += [markdown_table(r["rows"]), ""]
    save_text("\n".join(parts) + "\n", out / "summary.md")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for summary.md, results.json, log.txt, depth-sweep.png")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes and the plain path only (a CPU rehearsal)")
    p.add_argument("--budget-s", type=float, default=560, help="stop starting steps once this much time is spent")
    p.add_argument("--steps", nargs="+", default=[s[0] for s in STEPS], choices=[s[0] for s in STEPS])
    p.add_argument("--only-correctness", default=None, help=argparse.SUPPRESS)  # the child of the first step
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only_correctness:
        from common import save_rows

        save_rows(check_correctness(args.device, args.smoke), Path(args.only_correctness), [])
        return
    start = time.perf_counter()
    results = {"device": args.device, "smoke": args.smoke, "steps": {}}
    with open(out / "log.txt", "a") as log:
        for name, limit, script in STEPS:
            if name not in args.steps:
                continue
            left = args.budget_s - (time.perf_counter() - start)
            if left < 20:
                results["steps"][name] = {"status": "not run (budget spent)", "seconds": 0, "command": ""}
                continue
            if name == "depth-sweep":
                script = script + ["--plot", str(out / "depth-sweep.png")]
            results["steps"][name] = run_step(name, min(limit, left), script, args, log)
            print(f"{name}: {results['steps'][name]['status']} in {results['steps'][name]['seconds']} s", flush=True)
            write_summary(results, out)
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
