"""A sweep's results as the report sees them: Trial (one trial run), Cell (the trials of one
dataset x variant), Sweep (every cell); plain data, built by `loading` from the MLflow runs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from helix_sweep.sweep import schema as S


def split_variant(variant: str, frontend: str | None = None) -> tuple[str, str]:
    """(backbone, frontend) of a variant name such as 'helix-raw' (the frontend param wins)."""
    backbone, _, suffix = variant.rpartition("-")
    if frontend:
        return (variant[: -len(frontend) - 1] if variant.endswith("-" + frontend) else variant), frontend
    return (backbone, suffix) if backbone else (variant, "")


def dataset_kind(dataset: str, folds: Iterable[str]) -> str:
    """Which of the study's tables a dataset belongs to: folds, single, long_memory or speaker."""
    name = dataset.lower()
    if "concat" in name:
        return "long_memory"
    if "speaker" in name or name.startswith(("voxpopuli", "librispeech")):
        return "speaker"
    if any(str(f).isdigit() for f in folds):
        return "folds"
    return "single"


@dataclass
class Trial:
    """One trial run: the tags, params, latest metrics and per-epoch histories the report needs."""

    run_id: str
    key: str
    dataset: str
    variant: str
    fold: str
    status: str | None
    params: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]
    stop_reason: str = ""  # why it did not finish (the stop_reason tag): a grid rule's reason for ruled_oom

    @property
    def best(self) -> float | None:
        return self.metrics.get(S.BEST_TEST_ACC)

    @property
    def at_best_val(self) -> float | None:
        return self.metrics.get(S.TEST_ACC_AT_BEST_VAL)

    @property
    def final(self) -> float | None:
        """Final accuracy (the paper's "Final Acc"): the test accuracy of the last epoch logged."""
        h = self.history.get(S.TEST_ACC)
        return h[-1][1] if h else self.metrics.get(S.TEST_ACC)

    @property
    def best_epoch(self) -> int | None:
        value = self.metrics.get(S.BEST_EPOCH)
        return None if value is None else int(value)

    @property
    def epochs(self) -> int | None:
        """Epochs reached: the final `epochs_done`, else the last epoch with a test accuracy."""
        if S.EPOCHS_DONE in self.metrics:
            return int(self.metrics[S.EPOCHS_DONE])
        steps = [s for s, _ in self.history.get(S.TEST_ACC, [])]
        return max(steps) if steps else None

    @property
    def tokens(self) -> int | None:
        value = self.params.get(S.TOKENS_PER_CLIP)
        return int(float(value)) if value not in (None, "", "None") else None

    def mean_of(self, metric: str) -> float | None:
        values = [v for _, v in self.history.get(metric, [])]
        return sum(values) / len(values) if values else self.metrics.get(metric)

    def max_of(self, metric: str) -> float | None:
        values = [v for _, v in self.history.get(metric, [])]
        return max(values) if values else self.metrics.get(metric)


@dataclass
class Cell:
    """The trials of one (dataset, variant): a cell of the study's tables."""

    dataset: str
    variant: str
    folds: list[str]  # planned (or seen) folds, in order
    trials: dict[str, Trial]  # fold -> trial
    parent_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> list[Trial]:
        return [self.trials[f] for f in self.folds if f in self.trials and self.trials[f].status == S.FINISHED
                and self.trials[f].best is not None]

    def best_mean_std(self) -> tuple[float | None, float | None]:
        return S.mean_std([t.best for t in self.finished])

    def final_mean_std(self) -> tuple[float | None, float | None]:
        done = self.finished
        values = [t.final for t in done if t.final is not None]
        return S.mean_std(values) if done and len(values) == len(done) else (None, None)

    def first_fold(self) -> Trial | None:
        """The trial the paper's fold-1 view shows: fold 1, else the first fold that has a run."""
        return next((self.trials[f] for f in self.folds if f in self.trials), None)

    def at_best_val_mean_std(self) -> tuple[float | None, float | None]:
        done = self.finished
        values = [t.at_best_val for t in done if t.at_best_val is not None]
        return S.mean_std(values) if done and len(values) == len(done) else (None, None)

    def statuses(self) -> Counter:
        return Counter(self.trials[f].status if f in self.trials else None for f in self.folds)

    @property
    def complete(self) -> bool:
        return len(self.finished) == len(self.folds) > 0

    def tokens(self) -> int | None:
        return next((t.tokens for t in self.trials.values() if t.tokens is not None), None)


@dataclass
class Sweep:
    experiment: str
    experiment_id: str
    tracking_uri: str
    datasets: list[str]
    variants: list[str]
    cells: dict[tuple[str, str], Cell]
    trials: list[Trial]

    def cell(self, dataset: str, variant: str) -> Cell:
        return self.cells[(dataset, variant)]

    def kind(self, dataset: str) -> str:
        return dataset_kind(dataset, {f for (d, _), c in self.cells.items() if d == dataset for f in c.folds})

    def regime_tokens(self, dataset: str) -> int | None:
        """Tokens per clip of a dataset regime: the raw frontend's (the paper's axis), else any variant's."""
        cells = [c for (d, _), c in self.cells.items() if d == dataset]
        raw = [c.tokens() for c in cells if split_variant(c.variant)[1] == "raw" and c.tokens() is not None]
        other = [c.tokens() for c in cells if c.tokens() is not None]
        return max(raw or other, default=None)

    def by_length(self) -> list[str]:
        """Datasets ordered by sequence length (unknown length last), ties in the study's order."""
        return sorted(self.datasets, key=lambda d: (self.regime_tokens(d) is None, self.regime_tokens(d) or 0))
