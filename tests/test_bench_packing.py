"""benchmarks/packing.py (with benchmarks/calibrate.py) runs its CPU dry run: k = 1, 2 packed trials
per frontend, a (5 s) calibration of the smoke grid's shapes, and a calibration file the planner reads
(helix_sweep.training.packing). No figure is asserted: this keeps the GPU script from rotting."""

import subprocess
import sys
from pathlib import Path

from helix_sweep.training import budget
from helix_sweep.training.packing import load_calibration
from h200_image import h200_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "packing.py"


def test_packing_benchmark_dry_run_writes_a_calibration_the_planner_reads(tmp_path):
    out = tmp_path / "cpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "2", "--k", "1,2", "--batch", "2",
         "--clip-seconds", "0.5", "--calibrate-budget-s", "5", "--budget-s", "240", "--out", str(out),
         "--calibrate-args", "--grid smoke --batch-cap 2"],
        # with the packages the GPU session has on the lent H200 (tests/h200_image.py): its lazy imports too
        capture_output=True, text=True, timeout=400, env={**h200_env(tmp_path), "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "packing.md").read_text()
    for frontend, tokens in (("mel", 8), ("raw", 50)):
        for k in (1, 2):
            assert f"| esc50-shaped/helix-{frontend} @ {tokens} x 2 | {k} |" in report, report
    # the calibration's rows: the smoke grid's shapes, longest first, as many as 5 s allow
    assert "synth-concat/mamba-raw @ 100 x 2 [pure]" in report
    cal = load_calibration(out)
    assert cal.gpu == "cpu" and cal.auto_scan_impl == "pure"
    assert 1 <= len(cal.steps) <= 6
    raw = budget.PlanTrial("t", "MMMAMM", "raw", 50, epochs=1, train_clips=2)
    assert cal.packed_ratio(raw, 2) > 0
    smoke = budget.PlanTrial("s", "MMMMMM", "raw", 100, epochs=1, train_clips=2, batch_size=2, d_model=32,
                             d_state=8, precision="fp32")
    measured = cal.lookup(smoke)
    assert measured is not None and measured.batch == 2 and measured.step_s > 0
