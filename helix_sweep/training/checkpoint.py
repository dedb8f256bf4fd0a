"""Training state <-> a checkpoint file, written atomically, loadable with weights_only=True.

A checkpoint holds everything a bit-exact resume needs: model, optimizer, LR scheduler, grad
scaler, progress (epoch, step within the epoch, best metric, running sums of the epoch in flight,
per-epoch history), the augmentation generator and every global RNG (python, numpy, torch CPU and
CUDA), the trial's architecture (forced back on resume) and its MLflow run id.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimizer steps done in the epoch in flight
    global_step: int = 0
    best_test_acc: float = -1.0
    best_epoch: int = 0
    best_val_acc: float = -1.0
    test_acc_at_best_val: float = -1.0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    # running sums of the epoch in flight, so a mid-epoch resume reports the same epoch figures
    epoch_loss_sum: float = 0.0
    epoch_correct: float = 0.0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    history: list = field(default_factory=list)  # one metrics dict per completed epoch
    status: str = "running"  # running | finished | diverged | oom | failed
    stop_reason: str = ""  # why it ended other than finished, in words (kept: a relaunch reports it again)
    run_id: str = ""  # the trial's MLflow run, so resumed workers log into the same run

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, data: dict) -> "Progress":
        return cls(**data)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's key array as a tensor: weights_only loading refuses raw ndarrays
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate wants tuples; a round trip through some loaders can give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_state(state: dict, directory: Path) -> Path:
    """Write state to directory/state.pt through a temp file + rename: never a half-written file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state(directory: Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory}: no {STATE_FILE} in it")
    return torch.load(path, map_location="cpu", weights_only=True)


# On-disk checkpoints of a trial's run directory: epochEEEE-stepSSSSSSSS[-final]/state.pt, plus best/
BEST_DIR = "best"


class CheckpointStorageError(RuntimeError):
    """The checkpoint storage cannot be written (full, read-only, gone); earlier checkpoints are intact."""


def checkpoint_name(epoch: int, step: int, final: bool) -> str:
    return f"epoch{epoch:04d}-step{step:08d}" + ("-final" if final else "")


def step_of(path: Path) -> int:
    return int(Path(path).name.split("-step")[1].split("-")[0])


def checkpoints_on_disk(run_dir: str | Path) -> list[Path]:
    """The run directory's checkpoints with a state file, newest first (a -final one before its twin)."""
    root = Path(run_dir) if run_dir else None
    if root is None or not root.is_dir():
        return []
    found = [d for d in root.glob("epoch*-step*") if (d / STATE_FILE).is_file()]
    return sorted(found, key=lambda d: (step_of(d), d.name.endswith("-final")), reverse=True)


def load_newest(candidates: list[Path], warn=None) -> tuple[Path, dict] | None:
    """The first candidate that loads. A checkpoint cut short by a full disk (a truncated zip) is
    skipped with a warning naming it, so a half-written checkpoint is never the one resumed from."""
    for path in candidates:
        try:
            return path, load_state(path)
        except Exception as exc:  # truncated or corrupt: fall back to the one before
            if warn:
                warn(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); trying an older one")
    return None


def to_prune(names: list[str], keep: int, protected: set[str]) -> list[str]:
    """Checkpoint directories to delete: all but the newest `keep` by step and the protected ones
    (those Ray's run snapshot still lists: deleting one would make Ray refuse to restore the run).
    Pure, so the policy is tested without a file system."""
    newest = sorted(names, key=lambda n: (step_of(Path(n)), n.endswith("-final")), reverse=True)[:max(keep, 1)]
    return sorted(n for n in names if n not in newest and n not in protected)


def checkpoint_dirs(run_dir: str | Path) -> set[str]:
    """Names of the run directory's checkpoint folders, complete or not."""
    root = Path(run_dir) if run_dir else None
    return {d.name for d in root.glob("epoch*-step*") if d.is_dir()} if root and root.is_dir() else set()


def prune(run_dir: str | Path, keep: int, protected: set[str]) -> list[Path]:
    """Delete the run directory's checkpoints that `to_prune` selects (the best copy is never one)."""
    import shutil

    root = Path(run_dir)
    doomed = [root / n for n in to_prune(sorted(checkpoint_dirs(root)), keep, protected)]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed


def storage_error(key: str, run_dir: str | Path, cause: BaseException) -> CheckpointStorageError:
    """The one message for an unwritable storage: where, why, and what a rerun resumes from: the newest
    checkpoint that loads (a full disk can leave the one being copied in cut short)."""
    intact = load_newest(checkpoints_on_disk(run_dir))
    return CheckpointStorageError(
        f"{key}: checkpoint storage {run_dir} is not writable ({cause}); the previous checkpoint "
        f"{intact[0] if intact else '(none yet)'} is intact. Free or fix the storage, then rerun the same "
        "command: the trial resumes from it.")


def check_writable(directory: str | Path) -> None:
    """Write and remove a probe file (raises OSError), so an unwritable storage fails a (re)started
    trial at once instead of after a checkpoint interval of training."""
    if not directory:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-")
    with os.fdopen(fd, "wb") as f:
        f.write(b"helix")
        f.flush()
        os.fsync(f.fileno())
    os.unlink(probe)
