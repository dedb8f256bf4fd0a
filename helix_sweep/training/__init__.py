"""Training one trial; knows nothing of Ray or MLflow. The one entry the sweep imports:

- `run_training(spec, reporter)` and the seam it reports through: Reporter, TrialReport (start and
  end), EpochResult (each epoch, with is_best), Progress (helix_sweep.training.reporting, .loop);
- the cost model's figures the grid expansion carries on each trial: trial_budget, tokens_per_clip,
  and the cost model itself as `budget` (helix_sweep.training.budget); measured figures and GPU
  shares for packed trials as `packing` (helix_sweep.training.packing);
- checkpoint storage a runner's reporter persists, finds and prunes, and its one error
  (helix_sweep.training.checkpoint);
- the data a trial reads, checked before any trial starts: require_prepared (generates a synthetic
  set, names the prepare command of a missing real one) and DatasetNotPrepared (helix_sweep.data).
"""

from helix_sweep.data import DatasetNotPrepared, require_prepared
from helix_sweep.training import budget, packing
from helix_sweep.training.budget import tokens_per_clip, trial_budget
from helix_sweep.training.checkpoint import (
    BEST_DIR, CheckpointStorageError, Progress, check_writable, checkpoint_dirs, checkpoint_name, checkpoints_on_disk,
    load_newest,
    load_state, prune, save_state, storage_error,
)
from helix_sweep.training.loop import run_training
from helix_sweep.training.packing import format_fraction
from helix_sweep.training.reporting import EpochResult, Reporter, TrialReport

__all__ = [
    "BEST_DIR", "CheckpointStorageError", "DatasetNotPrepared", "EpochResult", "Progress", "Reporter",
    "TrialReport", "budget", "packing", "check_writable", "checkpoint_name", "checkpoints_on_disk", "format_fraction", "load_newest",
    "load_state", "prune", "require_prepared", "run_training", "save_state", "storage_error",
    "tokens_per_clip", "trial_budget",
]
