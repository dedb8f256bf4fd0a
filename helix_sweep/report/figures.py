"""The study's figures from a Sweep (PNG, matplotlib's Agg backend): accuracy bars raw vs mel with
fold error bars, the raw-minus-mel gap per backbone, training curves, accuracy vs sequence length."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from helix_sweep.report.paper import BACKBONE_TITLES, PAPER_RESULTS, dataset_title, paper_key
from helix_sweep.report.results import Sweep, split_variant
from helix_sweep.report.tables import cell_summary, slug
from helix_sweep.sweep import schema as S


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FRONTEND_COLORS = {"raw": "#1f77b4", "mel": "#ff7f0e"}


def _once(ax, label: str) -> str | None:
    """The label the first time it is used on these axes (one legend entry per series)."""
    used = ax.__dict__.setdefault("_helix_labels", set())
    if label in used:
        return None
    used.add(label)
    return label


def _backbones(variants: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(split_variant(v)[0] for v in variants))


def plot_accuracy_bars(sweep: Sweep, dataset: str, path: Path) -> Path:
    """Raw vs mel bars per backbone: mean best test accuracy, fold std as error bars, paper as ◆."""
    plt = _plt()
    backbones = _backbones(sweep.variants)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(backbones), 4))
    width = 0.38
    for j, frontend in enumerate(("raw", "mel")):
        for i, b in enumerate(backbones):
            v = f"{b}-{frontend}"
            if (dataset, v) not in sweep.cells:
                continue
            x = i + (j - 0.5) * width
            mean, std = sweep.cell(dataset, v).best_mean_std()
            if mean is not None:
                ax.bar(x, 100 * mean, width, yerr=100 * std if std else None, capsize=4,
                       color=FRONTEND_COLORS[frontend], label=_once(ax, frontend))
            else:
                ax.text(x, 1, cell_summary(sweep.cell(dataset, v)), rotation=90, ha="center", va="bottom", fontsize=8)
            p = PAPER_RESULTS.get(paper_key(dataset) or "", {}).get(v)
            if p is not None and p.acc is not None:
                ax.errorbar(x, p.acc, yerr=p.std, fmt="D", color="black", ms=5, capsize=3, label=_once(ax, "paper"))
    ax.set_xticks(range(len(backbones)), [BACKBONE_TITLES.get(b, b) for b in backbones])
    ax.set_ylabel("best test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{dataset_title(dataset)}: raw vs mel")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path, dpi=100)


def _save(plt, fig, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_gap(sweep: Sweep, path: Path) -> Path:
    """Raw minus mel (points of best test accuracy) per backbone, one bar per dataset; paper as ◆."""
    plt = _plt()
    backbones = _backbones(sweep.variants)
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(backbones), 4))
    n = max(len(sweep.datasets), 1)
    width = 0.8 / n
    for k, d in enumerate(sweep.datasets):
        for i, b in enumerate(backbones):
            raw, mel = sweep.cells.get((d, f"{b}-raw")), sweep.cells.get((d, f"{b}-mel"))
            x = i - 0.4 + width * (k + 0.5)
            (rm, _), (mm, _) = (raw.best_mean_std() if raw else (None, None)), (mel.best_mean_std() if mel else (None, None))
            if rm is not None and mm is not None:
                ax.bar(x, 100 * (rm - mm), width, color=f"C{k}", label=_once(ax, d))
            pr = PAPER_RESULTS.get(paper_key(d) or "", {})
            if pr.get(f"{b}-raw") and pr.get(f"{b}-mel") and pr[f"{b}-raw"].acc and pr[f"{b}-mel"].acc:
                ax.plot(x, pr[f"{b}-raw"].acc - pr[f"{b}-mel"].acc, "D", color="black", ms=5,
                        label=_once(ax, "paper"))
    if not ax.get_legend_handles_labels()[0]:
        ax.text(0.5, 0.5, "no backbone has both a raw and a mel result yet", transform=ax.transAxes,
                ha="center", va="center", color="gray")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(backbones)), [BACKBONE_TITLES.get(b, b) for b in backbones])
    ax.set_ylabel("raw − mel (points)")
    ax.set_title("Raw-minus-mel gap per backbone (◆ = paper)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path, dpi=100)


def plot_curves(sweep: Sweep, dataset: str, path: Path) -> Path:
    """Per variant: test accuracy per epoch of each fold (thin), train accuracy (dashed), val accuracy (dotted)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    variants = sweep.variants
    cols = min(3, len(variants))
    rows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False, sharey=True)
    for ax, v in zip(axes.flat, variants):
        cell = sweep.cell(dataset, v)
        for k, f in enumerate(cell.folds):
            t = cell.trials.get(f)
            if t is None:
                continue
            label = f"fold {f}" if f.isdigit() else f
            for metric, style in (("test_acc", "-"), ("train_acc", "--"), ("val_acc", ":")):
                h = t.history.get(metric)
                if h:
                    ax.plot([s for s, _ in h], [100 * y for _, y in h], style, color=f"C{k % 10}", lw=1,
                            label=label if metric == "test_acc" else None)
        ax.set_title(f"{v} ({cell_summary(cell)})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(variants):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    fig.suptitle(f"{dataset_title(dataset)}: test (solid), train (dashed), validation (dotted) accuracy")
    return _save(plt, fig, path, dpi=90)


def plot_accuracy_vs_length(sweep: Sweep, path: Path) -> Path:
    """Best test accuracy against tokens per clip, one line per variant; OOM/planned OOM as ✕ at 0."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, v in enumerate(sweep.variants):
        pts, fails = [], []
        for d in sweep.datasets:
            c = sweep.cell(d, v)
            mean, _ = c.best_mean_std()
            tok = c.tokens()
            if tok is None:
                continue
            if mean is not None:
                pts.append((tok, 100 * mean, d))
            elif {S.OOM, S.PLANNED_OOM} & set(c.statuses()):
                fails.append(tok)
        pts.sort()
        style = "-" if split_variant(v)[1] == "raw" else "--"
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=f"C{k}", label=v)
            for x, y, d in pts:
                ax.annotate(d, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if fails:
            ax.plot(fails, [0] * len(fails), "x", color=f"C{k}", ms=9, mew=2, label=f"{v} OOM")
    ax.set_xscale("log")
    ax.set_xlabel("tokens per clip (log)")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_ylim(-3, 100)
    ax.set_title("Accuracy vs sequence length")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path, dpi=100)


def study_figures(sweep: Sweep, outdir: Path) -> list[tuple[str, Path]]:
    """Write every figure into outdir; returns (caption, path) pairs."""
    outdir.mkdir(parents=True, exist_ok=True)
    figs = []
    for d in sweep.datasets:
        figs.append((f"{dataset_title(d)}: accuracy, raw vs mel", plot_accuracy_bars(sweep, d, outdir / f"accuracy_{slug(d)}.png")))
    figs.append(("Raw-minus-mel gap per backbone", plot_gap(sweep, outdir / "gap_raw_minus_mel.png")))
    figs.append(("Accuracy vs sequence length", plot_accuracy_vs_length(sweep, outdir / "accuracy_vs_length.png")))
    for d in sweep.datasets:
        figs.append((f"{dataset_title(d)}: training curves", plot_curves(sweep, d, outdir / f"curves_{slug(d)}.png")))
    return figs

