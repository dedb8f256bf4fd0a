"""benchmarks/scan.py runs at the smoke grid's sizes and reports every implementation as a ratio
to the project's scan timed in the same process (ratios only: no absolute time is asserted)."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scan.py"


def test_scan_benchmark_at_smoke_sizes_prints_ratios():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--targets", "scan", "--cases", "smoke-B32xL50",
                           "--repeats", "1", "--no-memory", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[scan] smoke-B32xL50 (d_model 32, d_state 8; pure runs mode fused)" in proc.stdout
    rows = dict(re.findall(r"^  (\S+)\s+[\d.]+ s  x\s*([\d.]+)", proc.stdout, flags=re.M))
    assert set(rows) == {"pure", "pure-whole", "pure-loop", "pure-parallel", "sequential", "mambapy"}, proc.stdout
    assert float(rows["pure"]) == 1.0
    assert all(float(r) > 0 for r in rows.values())
