"""Datasets of the study: prepare real sources once into Arrow shards, build tasks, augment batches.

    from helix_sweep.data import open_task, DatasetNotPrepared, DATASETS
    task = open_task(root, "synth-textures", fold=1, seed=0)
    x, y = task.train.get_batch([0, 5, 9])   # (3, task.clip_samples) float32, (3,) int64

Preparing a real dataset: python -m helix_sweep.data prepare <dataset> --source <dir|archive|url> --root <root>.
The task layer (and torch) is imported on first use, so prepare's worker processes stay light.
"""

_LAZY = {
    "open_task": "tasks",
    "DatasetNotPrepared": "tasks",
    "DATASETS": "tasks",
    "require_prepared": "tasks",
    "is_synthetic": "tasks",
    "Task": "tasks",
    "ClipSet": "tasks",
    "prepare": "prepare",
    "PrepareError": "layouts",
    "ensure_synthetic": "synthetic",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
