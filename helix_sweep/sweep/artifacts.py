"""A trial run's artifacts: the best epoch's confusion matrix (CSV tables and a PNG), the resolved
config and the best model's weights. Called through the rank-0 worker's outage buffer."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mlflow.tracking import MlflowClient


def confusion_tables(confusion: np.ndarray, label_names: Sequence[str]) -> tuple[str, str]:
    """CSV texts of a confusion matrix (rows = true class, columns = predicted) and per-class accuracy."""
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(label_names):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {len(label_names)} label names")
    names = [str(n).replace(",", ";") for n in label_names]
    lines = ["true\\predicted," + ",".join(names)]
    lines += [names[i] + "," + ",".join(str(int(v)) for v in row) for i, row in enumerate(cm)]
    support = cm.sum(axis=1)
    per_class = ["class,support,correct,accuracy"]
    for i, name in enumerate(names):
        acc = cm[i, i] / support[i] if support[i] else float("nan")
        per_class.append(f"{name},{int(support[i])},{int(cm[i, i])},{acc:.6f}")
    return "\n".join(lines) + "\n", "\n".join(per_class) + "\n"


def plot_confusion(confusion: np.ndarray, label_names: Sequence[str], path: Path, title: str = "") -> None:
    """Write a row-normalised confusion matrix as PNG (class names shown up to 60 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(label_names)
    size = min(4 + 0.25 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= 60:
        ax.set_xticks(range(n), [str(x) for x in label_names], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [str(x) for x in label_names], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix ({n} classes, {int(cm.sum())} clips)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_confusion_artifacts(client: MlflowClient, run_id: str, confusion: np.ndarray,
                            label_names: Sequence[str], artifact_path: str | None = None) -> list[str]:
    """Log confusion_matrix.png, confusion_matrix.csv and per_class_accuracy.csv to a run.

    `confusion[i, j]` counts clips of true class i predicted as j. Logging again replaces the files
    (use it with the best epoch's matrix). Returns the artifact file names.
    """
    cm_csv, per_class_csv = confusion_tables(confusion, label_names)
    with tempfile.TemporaryDirectory(prefix="helix-confusion-") as tmp:
        d = Path(tmp)
        (d / "confusion_matrix.csv").write_text(cm_csv)
        (d / "per_class_accuracy.csv").write_text(per_class_csv)
        plot_confusion(confusion, label_names, d / "confusion_matrix.png")
        client.log_artifacts(run_id, str(d), artifact_path)
        return sorted(p.name for p in d.iterdir())


def log_config_artifact(client: MlflowClient, run_id: str, config: Any, name: str = "config.yaml") -> None:
    """Log the trial's resolved config (an OmegaConf object, a dict or YAML text) as a YAML artifact."""
    if isinstance(config, str):
        text = config
    else:
        try:
            from omegaconf import OmegaConf

            text = OmegaConf.to_yaml(config if OmegaConf.is_config(config) else OmegaConf.create(config),
                                     resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            import yaml

            text = yaml.safe_dump(config, sort_keys=False)
    client.log_text(run_id, text, name)


def log_model_artifact(client: MlflowClient, run_id: str, state_dict: dict, name: str = "best_model.pt") -> None:
    """Log a model's weights (a state_dict saved with torch.save) as an artifact."""
    import torch

    with tempfile.TemporaryDirectory() as d:
        torch.save(state_dict, Path(d) / name)
        client.log_artifact(run_id, str(Path(d) / name))
