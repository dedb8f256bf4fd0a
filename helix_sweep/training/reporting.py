"""The seam between the training loop and whoever runs it (the sweep's Ray Train worker, a test):
what a trial reports at its start and end, what each epoch reports, and the Reporter receiving them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

from helix_sweep.training.checkpoint import Progress


@dataclass
class TrialReport:
    """What a trial reports when it starts (Reporter.start) and again when it ends (Reporter.finish)."""

    n_params: int  # parameters of the whole classifier
    n_params_per_layer: list[int]  # per layer, index 0 first
    d_ffn: int  # FFN width of the attention layers, matched to a BiMamba layer
    tokens_per_clip: int
    micro_batch: int  # clips per micro-step on this worker
    grad_accum: int  # micro-steps per optimizer step
    steps_per_epoch: int
    device: str
    precision: str  # what the trial trains in: fp32 | fp16 | bf16 (train.precision resolved on this device)
    scan_impl: str  # the selective scan the Mamba layers run here: cuda | triton | pure ("none": no Mamba layer)
    label_names: list[str]
    task: dict = field(default_factory=dict)  # the task's construction record (n_train, n_test, fold, ...)
    stop_reason: str = ""  # set when the trial ends other than finished (diverged, oom), in words


@dataclass
class EpochResult:
    """What one finished epoch reports, with its checkpoint (Reporter.commit)."""

    metrics: dict  # scalars: epoch, train/test loss and accuracy, lr, timing, best so far ("_ts": end time)
    is_best: bool = False  # a new best test accuracy: this epoch's state becomes the trial's best
    confusion: Optional[list[list[int]]] = None  # test confusion matrix (true x predicted) at a new best


class Reporter(Protocol):
    rank: int
    world_size: int

    def load(self) -> Optional[dict]: ...  # the latest committed checkpoint state, or None

    def start(self, progress: Progress, trial: TrialReport) -> str: ...  # open/reopen the run; returns its id

    # a checkpoint state, with the epoch that just ended (None for a mid-epoch or closing checkpoint)
    def commit(self, state: dict, epoch: Optional[EpochResult], progress: Progress) -> None: ...

    def finish(self, progress: Progress, trial: TrialReport) -> None: ...
