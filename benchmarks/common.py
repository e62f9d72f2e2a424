"""Shared pieces of the benchmarks: the hardware header, peak memory, the roofline floor, markdown tables.

Every benchmark prints `hardware_table(device)` first, so a pasted result always
says what it was measured on.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

# Measured peaks (bandwidth B/s, dense bf16 FLOP/s) of devices we have numbers for (issue 7).
DEVICE_PEAKS = {"H200": (4.3e12, 790e12)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_rows(device: torch.device) -> list[tuple[str, str]]:
    rows = [("date", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")),
            ("cpu", f"{cpu_model()} ({os.cpu_count()} logical cores)"),
            ("torch threads", str(torch.get_num_threads())),
            ("torch", torch.__version__),
            ("python", platform.python_version()),
            ("device", str(device))]
    if device.type == "cuda":
        rows.append(("gpu", torch.cuda.get_device_name(device)))
        rows.append(("cuda", str(torch.version.cuda)))
    return rows


def hardware_table(device: torch.device) -> str:
    return markdown_table([{"": k, "value": v} for k, v in hardware_rows(device)])


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: the process's peak RSS (cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_peaks(device: torch.device, bandwidth_gbs: float | None = None,
                 tflops: float | None = None) -> tuple[float, float] | None:
    """(bytes/s, FLOP/s) for the floor: the command-line values, else a known GPU, else None (no floor)."""
    if bandwidth_gbs and tflops:
        return bandwidth_gbs * 1e9, tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in DEVICE_PEAKS.items():
            if key in name:
                return peaks
    return None


def floor_seconds(bytes_moved: float, flops: float, peaks: tuple[float, float] | None) -> float | None:
    """Roofline lower bound: the slower of moving the bytes and doing the FLOPs at peak."""
    if peaks is None:
        return None
    bandwidth, flop_rate = peaks
    return max(bytes_moved / bandwidth, flops / flop_rate)


def add_generator_arguments(parser) -> None:
    """The model and run arguments bench_training.py and bench_sampling.py share."""
    parser.add_argument("--kind", nargs="+", default=["dnd", "ar1d", "rqt"], choices=["dnd", "ar1d", "rqt"],
                        help="generator kinds (ar1d = the flattened 1-D AR, one code per step)")
    parser.add_argument("--size", default="tiny", help="size preset: tiny, small, B, L, XL, XXL, XXXL")
    parser.add_argument("--grid", type=int, default=16, help="code grid side (positions = grid^2)")
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's choice); 1 by default because small models are "
                             "overhead-bound and spinning threads on a shared CPU slow them down many times")
    parser.add_argument("--out", default=None, help="also save the rows (.json or .csv)")


def start_generator_run(args) -> tuple[torch.device, tuple[float, float] | None]:
    """Device, threads and peaks from the shared generator arguments; prints the hardware table."""
    from dnd.runtime import resolve_device

    device = resolve_device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    peaks = device_peaks(device, args.bandwidth_gbs, args.peak_tflops)
    print(hardware_table(device), end="\n\n")
    return device, peaks


def add_peak_arguments(parser) -> None:
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="memory bandwidth for the floor, GB/s (default: known GPUs only; no floor on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak for the floor, TFLOP/s (default: known GPUs only; no floor on CPU)")


def save_rows(rows: list[dict], path: Path, header: list[tuple[str, str]]) -> None:
    """Rows to `path`: .json (with the hardware rows) or .csv (one line per row), written atomically."""
    import csv
    import io

    from dnd.checkpoint import save_json, save_text

    path = Path(path)
    if path.suffix == ".json":
        save_json({"hardware": dict(header), "rows": rows}, path)
    elif path.suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        save_text(buf.getvalue(), path)
    else:
        raise ValueError(f"--out {path}: expected a .json or .csv file name")


KIND_LABELS = {"dnd": "dnd", "ar1d": "ar1d (flat)", "rqt": "rqt"}


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def print_and_save(rows: list[dict], device: torch.device, out: str | Path | None) -> None:
    """Print a benchmark's final table; also save it with the hardware rows when `out` is given."""
    print(markdown_table(rows))
    if out:
        save_rows(rows, Path(out), hardware_rows(device))


def print_rows(rows: list[dict], device: torch.device, peaks, out: str | None) -> None:
    """The final table of a generator benchmark, its footnotes, and the optional saved copy."""
    print_and_save(rows, device, out)
    if device.type != "cuda":
        print("\n(peak MiB on the CPU: the process's peak RSS so far, so it never decreases down the table)")
    if peaks is None:
        print("\n(no floor: peak FLOP/s and bandwidth are only known for listed GPUs; "
              "pass --peak-tflops and --bandwidth-gbs to set them)")
