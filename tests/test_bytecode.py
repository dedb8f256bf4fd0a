"""README command 1's bytecode step: it compiles what a sweep imports and skips only what none does."""
import json
import os
import subprocess
import sys
from pathlib import Path

from helix_sweep import bytecode

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str = "X = 1\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def pyc(source: Path) -> Path:
    import importlib.util
    return Path(importlib.util.cache_from_source(str(source)))


def test_compiles_all_but_test_suites_and_listed_subtrees_and_counts_what_does_not_compile(tmp_path):
    # root's own path may hold a skipped name: only what lies below it counts
    site = tmp_path / "test" / "site-packages"
    kept = [write(site / "ray" / "tune" / "a.py"), write(site / "ray" / "b.py"), write(site / "torch" / "c.py")]
    skipped = [write(site / "ray" / "rllib" / "d.py"), write(site / "pandas" / "tests" / "e.py"),
               write(site / "torch" / "x" / "test" / "f.py"), write(site / "pip" / "g.py")]
    broken = write(site / "torch" / "template.py", "def (:\n")

    files, failed = bytecode.compile_tree(site, skip=("ray/rllib", "pip"), workers=2)

    assert (files, failed) == (len(kept) + 1, 1)
    assert all(pyc(p).is_file() for p in kept)
    assert not any(pyc(p).exists() for p in skipped + [broken])
    # up-to-date bytecode is left as it is
    stamp = [pyc(p).stat().st_mtime_ns for p in kept]
    assert bytecode.compile_tree(site, skip=("ray/rllib", "pip"), workers=1) == (len(kept) + 1, 1)
    assert [pyc(p).stat().st_mtime_ns for p in kept] == stamp


def test_a_skipped_name_matches_whole_path_parts_only(tmp_path):
    pattern = bytecode.skip_pattern(tmp_path, skip=("ray/rllib",))
    assert pattern.search(f"{tmp_path}/ray/rllib/x.py")
    assert pattern.search(f"{tmp_path}/scipy/linalg/tests/x.py")
    assert not pattern.search(f"{tmp_path}/ray/rllib_utils/x.py")
    assert not pattern.search(f"{tmp_path}/numpy/testing/x.py")
    assert not pattern.search(f"{tmp_path}/other/ray/rllib/x.py")


def test_nothing_a_sweep_process_imports_is_skipped(tmp_path):
    # Every module helix_sweep has and the entry modules of the processes a sweep starts (Ray Tune
    # and Train, a search's Optuna, Ray's agents, the MLflow server), then the work that imports
    # lazily (a first training step loads ~880 more modules, torch._dynamo among them; the tracking
    # store's migrations; the data generators' scipy.signal; the report's PNG): none of it may come
    # from a skipped path, or every such process would compile it from source.
    entry = ["ray.tune", "ray.train.torch", "ray.tune.search.optuna", "optuna", "ray.dashboard.agent",
             "ray._private.log_monitor", "ray._private.runtime_env.agent.main", "mlflow.cli",
             "mlflow.server.fastapi_app", "uvicorn", "matplotlib.backends.backend_agg"]
    script = f"""
import importlib, json, pkgutil, sys, warnings
warnings.simplefilter("ignore")
import helix_sweep
for m in [m.name for m in pkgutil.walk_packages(helix_sweep.__path__, "helix_sweep.")] + {entry!r}:
    importlib.import_module(m)
import torch
from helix_sweep.models.classifier import build_classifier
for frontend in ("raw", "mel"):
    model = build_classifier("MA", frontend, 3, d_model=16, d_state=4, num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16000)).sum().backward()
    optimizer.step()
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
SqlAlchemyStore("sqlite:///{tmp_path}/mlflow.db", "{tmp_path}/artifacts")
from scipy import signal
import matplotlib.pyplot as plt
plt.plot([1, 2])
plt.savefig("{tmp_path}/plot.png")
print(json.dumps(sorted({{getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}})))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MPLBACKEND": "Agg"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    files = json.loads(out.stdout.splitlines()[-1])
    roots = bytecode.roots()
    inside = [f for f in files for root in roots if f.startswith(f"{root}/")]
    assert len(inside) > 4000, "the imports did not load torch, Ray and MLflow from this environment"
    skipped = [f for f in inside for root in roots
               if f.startswith(f"{root}/") and bytecode.skip_pattern(root).search(f)]
    assert skipped == []


def test_the_command_takes_no_arguments(capsys):
    assert bytecode.main(["--all"]) == 2
    assert "takes no arguments" in capsys.readouterr().err


def test_nothing_to_skip_matches_nothing(tmp_path):
    pattern = bytecode.skip_pattern(tmp_path, skip=(), anywhere=())
    assert not pattern.search(f"{tmp_path}/a/tests/b.py")
    assert bytecode.compile_tree(tmp_path, skip=(), workers=1, anywhere=()) == (0, 0)
