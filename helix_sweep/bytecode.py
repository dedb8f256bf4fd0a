"""Write the bytecode of what a sweep imports, once, before the sweep: README command 1's install step.

Where `PYTHONDONTWRITEBYTECODE=1` is set (these machines), a module installed without its `.pyc` is
compiled from source by every process that imports it (the driver, each Ray worker, the MLflow
server), so the install must write the bytecode (the smoke sweep took 199 s without, 108 s with).
uv's `--compile-bytecode` compiles all ~19,000 files of the environment (291 MB); a smoke sweep
reads 5,941 of them (111 MB). This compiles the environment less the test suites packages ship and
the subtrees no helix_sweep process imports (172 MB), in parallel, with the standard library's
compileall; anything skipped still imports, compiled in memory. Figures: benchmarks/RESULTS.md,
session 14.

    python -m helix_sweep.bytecode            # the environment's site-packages and helix_sweep
"""
from __future__ import annotations

import compileall
import functools
import os
import re
import sys
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Directory names skipped wherever they sit: the test suites packages ship (pandas' alone: 1,143 files).
SKIP_ANYWHERE = ("tests", "test")

# Subtrees of site-packages that no helix_sweep process imports (a smoke sweep read none of their
# files; tests/test_bytecode.py imports every process's entry modules against this list).
SKIP = (
    # Ray's other libraries
    "ray/rllib", "ray/serve", "ray/llm",
    # torch.compile's code generation (nothing here compiles a graph); numba's CUDA target (the GPU
    # scan is Triton's or mamba_ssm's); sympy's physics (torch imports sympy's core)
    "torch/_inductor/codegen", "torch/_inductor/fx_passes", "numba/cuda", "sympy/physics",
    # clients for clouds a sweep never calls (MLflow's Databricks SDK, Ray's Google autoscaler)
    "databricks/sdk", "google/api_core", "google/auth",
    # font subsetting for PDF/PS output (the report writes PNG)
    "fontTools/ttLib", "fontTools/varLib",
    # installers and the tests' tools: README command 2 installs with uv's --compile-bytecode
    "pip", "setuptools", "pkg_resources", "virtualenv", "distlib", "_pytest", "playwright",
    # dependencies of dependencies for features no sweep uses (MLflow's sklearn and GraphQL
    # flavours and its gunicorn and huey servers, torch.fx's graph partitioners)
    "sklearn", "skops", "networkx", "narwhals", "joblib", "graphql", "graphene", "gunicorn", "huey",
    "pyasn1_modules",
)


def skip_pattern(root: str | Path, skip: tuple[str, ...] = SKIP,
                 anywhere: tuple[str, ...] = SKIP_ANYWHERE) -> re.Pattern:
    """The paths under `root` not to compile: a subtree in `skip` (relative to root), or a directory
    named in `anywhere` at any depth below root (root's own path may hold any name)."""
    parts = []
    if skip:
        parts.append(rf"(?:{'|'.join(re.escape(path) for path in skip)})/")
    if anywhere:
        parts.append(rf"(?:.*/)?(?:{'|'.join(re.escape(name) for name in anywhere)})/")
    if not parts:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile(rf"^{re.escape(str(root))}/(?:{'|'.join(parts)})")


def sources(root: str | Path, pattern: re.Pattern) -> list[str]:
    """The .py files under `root` that `pattern` does not match; skipped directories are not entered."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"
                       and not pattern.search(os.path.join(dirpath, d) + "/")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if f.endswith(".py") and not pattern.search(os.path.join(dirpath, f))]
    return found


def compile_tree(root: str | Path, skip: tuple[str, ...] = SKIP, workers: int | None = None,
                 anywhere: tuple[str, ...] = SKIP_ANYWHERE) -> tuple[int, int]:
    """Compile every source under `root` but the skipped ones, `workers` processes (all cores by
    default) at a time; a file whose .pyc is up to date is left as it is. Returns (files, failed):
    a file that does not compile (a template, an old syntax) cannot be imported either."""
    files = sources(root, skip_pattern(root, skip, anywhere))
    compile_one = functools.partial(compileall.compile_file, quiet=2)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        results = list(map(compile_one, files))
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(compile_one, files, chunksize=64))
    return len(files), results.count(False)


def roots() -> list[Path]:
    """This environment's site-packages and helix_sweep's own package (an editable install's
    sources stay in the clone)."""
    paths = sysconfig.get_paths()
    site = {Path(paths[key]) for key in ("purelib", "platlib")}
    return sorted(site) + [Path(__file__).resolve().parent]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print("usage: python -m helix_sweep.bytecode  (compiles this environment; takes no arguments)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    total = failed = 0
    for root in roots():
        if root.is_dir():
            files, bad = compile_tree(root)
            total, failed = total + files, failed + bad
    print(f"bytecode: {total} files compiled or up to date in {time.perf_counter() - start:.1f} s "
          f"({failed} do not compile; test suites and {len(SKIP)} subtrees no sweep imports skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
