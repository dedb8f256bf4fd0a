"""README command 1's bytecode step against compiling the whole environment (what uv's
--compile-bytecode does), in one process, alternately.

It hard-links this environment's site-packages' sources (no .pyc) into a scratch tree and reads
every source once (a warm page cache for both cases); then each round compiles the tree twice from
nothing with the same compileall workers: once all of it, once less what helix_sweep.bytecode skips.
Prints files, megabytes and seconds of each, and the ratio.

    .venv/bin/python benchmarks/bytecode.py [--rounds 2] [--workers N] [--site DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from helix_sweep import bytecode


def link_sources(site: Path, dest: Path) -> None:
    """The .py files of `site` under `dest`, hard links where one filesystem holds both."""
    for dirpath, dirnames, filenames in os.walk(site):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out = dest / Path(dirpath).relative_to(site)
        out.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            if name.endswith(".py"):
                try:
                    os.link(Path(dirpath, name), out / name)
                except OSError:
                    shutil.copy2(Path(dirpath, name), out / name)


def read_all(tree: Path) -> None:
    """Read every source once, so that no case pays for a cold page cache (the first otherwise did:
    72 s against 33 s for the same compile)."""
    for path in tree.rglob("*.py"):
        path.read_bytes()


def drop_bytecode(tree: Path) -> None:
    for cache in list(tree.rglob("__pycache__")):
        shutil.rmtree(cache)


def megabytes(files: list[str]) -> float:
    return sum(os.path.getsize(f) for f in files) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--site", type=Path, default=bytecode.roots()[0],
                        help="the tree to copy and compile (default: this environment's site-packages)")
    args = parser.parse_args(argv)
    site = args.site
    # a kill still removes the scratch tree (it lies inside the environment, for the hard links)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bytecode-bench-", dir=site.parent) as scratch:
        tree = Path(scratch) / "site-packages"
        link_sources(site, tree)
        read_all(tree)
        cases = {"all (uv --compile-bytecode)": ((), ()),
                 "helix_sweep.bytecode": (bytecode.SKIP, bytecode.SKIP_ANYWHERE)}
        sizes = {name: megabytes(bytecode.sources(tree, bytecode.skip_pattern(tree, *skips)))
                 for name, skips in cases.items()}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(args.rounds):
            order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
            for name in order:
                drop_bytecode(tree)
                start = time.perf_counter()
                skip, anywhere = cases[name]
                files, failed = bytecode.compile_tree(tree, skip, args.workers, anywhere)
                times[name].append(time.perf_counter() - start)
                print(f"round {round_ + 1}  {name:28s} {files:6d} files {sizes[name]:6.1f} MB "
                      f"{times[name][-1]:6.1f} s ({failed} do not compile)", flush=True)
    base, ours = (min(times[name]) for name in cases)
    print(f"\nbest of {args.rounds}: all {base:.1f} s, helix_sweep.bytecode {ours:.1f} s: "
          f"{base / ours:.2f}x faster ({args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
