"""Subprocesses that see only the Python packages of the lent H200 machines' image
(benchmarks/h200_packages.txt) plus the wheels a GPU session carries there (benchmarks/gpu_wheels.txt):
any other third-party import fails, as it would on that machine, where nothing can be fetched."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "benchmarks" / "h200_packages.txt"
WHEELS = ROOT / "benchmarks" / "gpu_wheels.txt"

# a sitecustomize: a module is importable when a distribution it comes from is allowed (or none does:
# the standard library, this checkout)
_SITECUSTOMIZE = '''
import importlib.metadata, re, sys

ALLOWED = {allowed!r}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
BLOCKED = {{module for module, dists in importlib.metadata.packages_distributions().items()
           if not any(norm(d) in ALLOWED for d in dists)}}


class NotOnTheImage:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}: not on the H200 image "
                                      f"(benchmarks/h200_packages.txt) nor carried (benchmarks/gpu_wheels.txt)",
                                      name=name)
        return None


sys.meta_path.insert(0, NotOnTheImage())
'''


def distributions(path: Path) -> set[str]:
    return {re.sub(r"[-_.]+", "-", line.strip()).lower() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def h200_env(tmp_path: Path, carried: bool = True) -> dict:
    """os.environ for a subprocess with the image's packages, and the carried wheels' if `carried`."""
    allowed = distributions(IMAGE) | (distributions(WHEELS) if carried else set()) | {"helix-sweep"}
    site = tmp_path / ("h200-site" if carried else "h200-site-bare")
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(allowed=sorted(allowed)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
