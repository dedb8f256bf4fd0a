"""benchmarks/bytecode.py compiles a copy, never the tree it measures, and reports both cases."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_compiles_a_scratch_copy_and_prints_the_ratio(tmp_path):
    site = tmp_path / "site-packages"
    for rel in ("ray/tune/a.py", "ray/rllib/b.py", "pandas/tests/c.py", "numpy/d.py"):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text("X = [i for i in range(3)]\n")
    out = subprocess.run([sys.executable, "benchmarks/bytecode.py", "--site", str(site), "--rounds", "2",
                          "--workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum("all (uv --compile-bytecode)" in line and " 4 files" in line for line in lines) == 2
    assert sum("helix_sweep.bytecode" in line and " 2 files" in line for line in lines) == 2
    assert "x faster" in lines[-1]
    # the measured tree itself gains no bytecode, and the scratch copy is gone
    assert not list(site.rglob("*.pyc"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-packages"]
