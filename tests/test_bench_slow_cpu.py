"""benchmarks/slow_cpu.sh slows every thread alike, one busy or all (what a CPU quota does not), runs
Ray's workers at nice 0, and leaves the machine as it found it. Shares of a core are asserted, not
times."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "slow_cpu.sh"
AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")

# one busy thread for 1.5 s of wall time: the share of a core it got, and what the script passed on
PROBE = """
import os, time
w0, c0 = time.perf_counter(), time.process_time()
while time.perf_counter() - w0 < 1.5:
    pass
print(f"share={(time.process_time() - c0) / (time.perf_counter() - w0):.3f}")
print(f"niceness={os.environ.get('RAY_worker_niceness')}")
"""


def loops() -> list[str]:
    out = subprocess.run(["pgrep", "-f", "while :; do :; done"], capture_output=True, text=True).stdout
    return out.split()


def test_usage_error_names_the_missing_command():
    proc = subprocess.run(["bash", str(SCRIPT), "--"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(AUTOGROUP, os.W_OK) or os.cpu_count() > 8,
                    reason="needs root (nice -3, the autogroup switch) on a small machine")
def test_one_busy_thread_gets_a_third_of_its_core():
    assert not loops(), "busy loops from something else are running"
    autogroup = AUTOGROUP.read_text()
    proc = subprocess.run(["bash", str(SCRIPT), "--", sys.executable, "-c", PROBE],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split("=") for line in proc.stdout.split())
    # 1024 / (1024 + 1991) = 0.34 of a core at nice -3; a 0.69-core quota would give this thread 0.69
    assert float(out["share"]) < 0.45, proc.stdout
    assert out["niceness"] == "0"
    assert AUTOGROUP.read_text() == autogroup
    assert not loops()
