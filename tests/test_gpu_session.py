"""benchmarks/gpu_session.sh on the lent H200, whose image lacks some of our dependencies and can fetch
nothing: with the wheels benchmarks/gpu_wheels.sh fetches (carried as .whl/), everything it runs imports.
(tests/test_bench_packing.py runs its packing dry run with the same packages.)"""

import subprocess
import sys

from h200_image import ROOT, h200_env

SESSION_TESTS = ["tests/test_scan.py", "tests/test_scan_triton.py", "tests/test_scan_dispatch.py",
                 "tests/test_ddp_gpu.py"]


def run(env, *args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# the session's steps, in one interpreter (each its own would cost ~3 s of imports): its import check,
# `python -m helix_sweep.models`, the test files' collection, the benchmarks' command lines
STEPS = """
import runpy, sys
import {modules}
import pytest
for argv, run in ((["helix_sweep.models", "d_model=32"], runpy.run_module),
                  (["benchmarks/gpu_check.py", "--help"], runpy.run_path),
                  (["benchmarks/packing.py", "--help"], runpy.run_path)):
    sys.argv = list(argv)
    try:
        run(argv[0], run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *{tests!r}]))
"""


def test_what_the_gpu_session_runs_imports_with_the_image_and_the_carried_wheels(tmp_path):
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    [check] = [line for line in script.splitlines() if "-c \"import helix_sweep" in line]
    modules = check.split('-c "import ', 1)[1].split('"', 1)[0]  # the session's own import check
    assert "helix_sweep.training.loop" in modules
    done = run(h200_env(tmp_path), "-c", STEPS.format(modules=modules, tests=SESSION_TESTS))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "selective scan" in done.stdout and "usage: packing.py" in done.stdout and "tests collected" in done.stdout


def test_without_the_wheels_the_image_lacks_omegaconf(tmp_path):
    # the check above is only as good as its stand-in for the image: without the wheels it must fail
    done = run(h200_env(tmp_path, carried=False), "-c", "import helix_sweep.models")
    assert done.returncode != 0 and "No module named 'omegaconf': not on the H200 image" in done.stderr, done.stderr
