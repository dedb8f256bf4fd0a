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
