"""The prepared GPU command (benchmarks/gpu_checks.py) must work the day a GPU is lent: rehearse it here."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_checks_rehearse_on_the_cpu(tmp_path):
    steps = ["correctness", "sample-b50", "train-b32", "depth-sweep"]
    proc = subprocess.run([sys.executable, ROOT / "benchmarks/gpu_checks.py", "--out", tmp_path, "--smoke",
                           "--device", "cpu", "--steps", *steps], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results["steps"]) == sorted(steps)
    for name, step in results["steps"].items():
        assert step["status"] == "ok", (name, step, (tmp_path / "log.txt").read_text()[-3000:])
    checks = results["steps"]["correctness"]["rows"]
    assert [r["kind"] for r in checks] == ["dnd", "ar1d", "rqt"]
    assert all(r["greedy == teacher-forced"] == 1.0 for r in checks)  # fp32 on the CPU: exact
    assert len(results["steps"]["depth-sweep"]["rows"]) == 12 and (tmp_path / "depth-sweep.png").stat().st_size
    summary = (tmp_path / "summary.md").read_text()
    assert "## train-b32: ok" in summary and "| dnd |" in summary
    # Only the files the device tool returns (at most 8), none of the per-step temporaries.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["depth-sweep.png", "log.txt", "results.json", "summary.md"]
