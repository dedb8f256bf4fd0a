"""Storage that refuses writes, for tests: a read-only directory, a tiny tmpfs (mounts need root; the
tests skip, saying so, where mounting is not allowed)."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def read_only(directory: Path):
    """Make a directory read-only for the processes writing to it: a read-only bind mount over it
    (root ignores file modes), or the file modes when not root."""
    if os.geteuid() != 0:
        paths = [directory, *directory.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    done = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


@contextmanager
def tmpfs(directory: Path, size_mb: int):
    """A small tmpfs mounted at directory (root only; skips where mounting is not allowed)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)
