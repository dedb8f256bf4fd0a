"""The study's figures from a Sweep (PNG, matplotlib's Agg backend), as the paper draws them:

- Figure 1 (accuracy_vs_length.png, three panels): best test accuracy per dataset regime ordered by
  sequence length; the raw-minus-mel gap per backbone; the HELIX minus pure-Mamba advantage per regime;
- Figures 2 and 3 (accuracy_<dataset>.png): raw vs mel bars per backbone, fold std as error bars, each
  bar annotated with its best epoch (Figure 2 is ESC-50, Figure 3 Speech Commands);
- Figures 4-7 (curves_smoothed_<dataset>.png): test accuracy per epoch of every variant on fold 1 (or the
  single split), smoothed over 7 epochs, each variant's best accuracy as a horizontal line;
- per-fold curves (curves_<dataset>.png) and the gap alone (gap_raw_minus_mel.png), beyond the paper.

Each `*_figure` function returns the matplotlib Figure (tests read its artists); `study_figures` saves them.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from helix_sweep.report.paper import (BACKBONE_TITLES, PAPER_RESULTS, SMOOTH_EPOCHS, dataset_title, paper_acc,
                                      paper_key)
from helix_sweep.report.results import Cell, Sweep, split_variant
from helix_sweep.report.tables import cell_summary, slug
from helix_sweep.sweep import schema as S


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FRONTEND_COLORS = {"raw": "#1f77b4", "mel": "#ff7f0e"}
BACKBONE_COLORS = {"mamba": "#2ca02c", "helix": "#d62728", "attention": "#9467bd"}
FRONTEND_STYLES = {"raw": "-", "mel": "--"}
BEST_STYLES = {"raw": ":", "mel": "-."}  # the best-accuracy lines of Figures 4-7


def _once(ax, label: str) -> str | None:
    """The label the first time it is used on these axes (one legend entry per series)."""
    used = ax.__dict__.setdefault("_helix_labels", set())
    if label in used:
        return None
    used.add(label)
    return label


def _backbones(variants: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(split_variant(v)[0] for v in variants))


def _color(variant: str, k: int) -> str:
    return BACKBONE_COLORS.get(split_variant(variant)[0], f"C{k % 10}")


def smooth(values: Sequence[float], window: int = SMOOTH_EPOCHS) -> list[float]:
    """Trailing moving average over `window` epochs (fewer at the start), as the paper's curves."""
    import pandas as pd

    return pd.Series(values, dtype=float).rolling(window, min_periods=1).mean().tolist()


def best_epoch_text(cell: Cell) -> str:
    """A bar's annotation: the best epoch of a single split, the mean best epoch over finished folds."""
    epochs = [t.best_epoch for t in cell.finished if t.best_epoch is not None]
    if not epochs:
        return ""
    if len(cell.folds) == 1:
        return f"ep {epochs[0]}"
    return f"ep {sum(epochs) / len(epochs):.0f} (mean)"


# ----------------------------------------------------------------------------------------------
# Figure 1: sequence length
# ----------------------------------------------------------------------------------------------

def regime_label(sweep: Sweep, dataset: str) -> str:
    """An x tick of Figure 1: the dataset's title wrapped to a narrow column, then its tokens per clip."""
    title = "\n".join(textwrap.wrap(dataset_title(dataset), 14))
    tokens = sweep.regime_tokens(dataset)
    return f"{title}\n{tokens:,} tok" if tokens is not None else title


def helix_advantage(sweep: Sweep) -> list[tuple[str, str, float]]:
    """(dataset, frontend, HELIX minus pure Mamba in points of best test accuracy), regimes by length."""
    out = []
    for d in sweep.by_length():
        for frontend in ("raw", "mel"):
            helix, mamba = sweep.cells.get((d, f"helix-{frontend}")), sweep.cells.get((d, f"mamba-{frontend}"))
            if helix is None or mamba is None:
                continue
            (h, _), (m, _) = helix.best_mean_std(), mamba.best_mean_std()
            if h is not None and m is not None:
                out.append((d, frontend, 100 * (h - m)))
    return out


def _draw_accuracy_vs_length(ax, sweep: Sweep, order: list[str]) -> None:
    """Best test accuracy per dataset regime (x: regimes ordered by length), one line per variant."""
    x = {d: i for i, d in enumerate(order)}
    for k, v in enumerate(sweep.variants):
        pts, fails = [], []
        for d in order:
            c = sweep.cell(d, v)
            mean, _ = c.best_mean_std()
            if mean is not None:
                pts.append((x[d], 100 * mean))
            elif {S.OOM, S.PLANNED_OOM} & set(c.statuses()):
                fails.append(x[d])
            p = paper_acc(d, v)
            if p is not None:
                ax.plot(x[d], p, "D", mfc="none", color=_color(v, k), ms=6, label=_once(ax, "paper (◇)"))
        style = FRONTEND_STYLES.get(split_variant(v)[1], ":")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=_color(v, k), label=v)
        if fails:
            ax.plot(fails, [2] * len(fails), "x", color=_color(v, k), ms=9, mew=2, label=f"{v} OOM")
    ax.set_xticks(range(len(order)), [regime_label(sweep, d) for d in order], fontsize=7)
    ax.set_ylabel("best test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("(a) accuracy by sequence length")
    ax.grid(alpha=0.3)
    _legend_below(ax)


def _draw_gap(ax, sweep: Sweep) -> None:
    """Raw minus mel (points of best test accuracy) per backbone, one bar per dataset; paper as ◆."""
    backbones = _backbones(sweep.variants)
    n = max(len(sweep.datasets), 1)
    width = 0.8 / n
    for k, d in enumerate(sweep.by_length()):
        for i, b in enumerate(backbones):
            raw, mel = sweep.cells.get((d, f"{b}-raw")), sweep.cells.get((d, f"{b}-mel"))
            x = i - 0.4 + width * (k + 0.5)
            (rm, _), (mm, _) = (raw.best_mean_std() if raw else (None, None)), (mel.best_mean_std() if mel else (None, None))
            if rm is not None and mm is not None:
                ax.bar(x, 100 * (rm - mm), width, color=f"C{k}", label=_once(ax, dataset_title(d)))
            pr, pm_ = paper_acc(d, f"{b}-raw"), paper_acc(d, f"{b}-mel")
            if pr is not None and pm_ is not None:
                ax.plot(x, pr - pm_, "D", color="black", ms=5, label=_once(ax, "paper"))
    if not ax.get_legend_handles_labels()[0]:
        ax.text(0.5, 0.5, "no backbone has both a raw\nand a mel result yet", transform=ax.transAxes,
                ha="center", va="center", color="gray")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(backbones)), [BACKBONE_TITLES.get(b, b) for b in backbones])
    ax.set_ylabel("raw − mel (points)")
    ax.set_title("(b) raw − mel gap per backbone (◆ = paper)")
    _legend_below(ax)
    ax.grid(axis="y", alpha=0.3)


def _draw_helix_advantage(ax, sweep: Sweep, order: list[str]) -> None:
    """HELIX minus pure Mamba per dataset regime (x: regimes ordered by length), one line per frontend."""
    x = {d: i for i, d in enumerate(order)}
    adv = helix_advantage(sweep)
    for frontend in ("raw", "mel"):
        pts = [(x[d], gap) for d, f, gap in adv if f == frontend]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], FRONTEND_STYLES[frontend], marker="o",
                    color=FRONTEND_COLORS[frontend], label=frontend)
            for px, py in pts:
                ax.annotate(f"{py:+.1f}", (px, py), fontsize=7, xytext=(4, 4), textcoords="offset points")
        for d in order:
            h, m = paper_acc(d, f"helix-{frontend}"), paper_acc(d, f"mamba-{frontend}")
            if h is not None and m is not None:
                ax.plot(x[d], h - m, "D", mfc="none", color=FRONTEND_COLORS[frontend], ms=6,
                        label=_once(ax, f"paper {frontend} (◇)"))
    if not adv:
        ax.text(0.5, 0.5, "no regime has both a HELIX\nand a pure-Mamba result yet", transform=ax.transAxes,
                ha="center", va="center", color="gray")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(order)), [regime_label(sweep, d) for d in order], fontsize=7)
    ax.set_ylabel("HELIX − pure Mamba (points)")
    ax.margins(y=0.15)  # room for the point labels
    ax.set_title("(c) HELIX advantage by sequence length")
    ax.grid(alpha=0.3)
    _legend_below(ax)


def _legend_below(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)


def length_figure(sweep: Sweep):
    """Figure 1: (a) accuracy by length, (b) raw − mel gap, (c) HELIX − pure Mamba by length."""
    plt = _plt()
    order = sweep.by_length()
    fig, axes = plt.subplots(1, 3, figsize=(max(14, 3 * len(order) + 5), 5.2))
    _draw_accuracy_vs_length(axes[0], sweep, order)
    _draw_gap(axes[1], sweep)
    _draw_helix_advantage(axes[2], sweep, order)
    fig.suptitle("Figure 1 · sequence length: one point per dataset regime, ordered by tokens per clip (raw)")
    return fig


def gap_figure(sweep: Sweep):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(_backbones(sweep.variants)), 4))
    _draw_gap(ax, sweep)
    return fig


# ----------------------------------------------------------------------------------------------
# Figures 2 and 3: raw vs mel bars, best epochs
# ----------------------------------------------------------------------------------------------

def accuracy_bars_figure(sweep: Sweep, dataset: str):
    """Raw vs mel bars per backbone: mean best test accuracy, fold std as error bars, the best epoch above
    each bar, the paper as ◆ (with its epochs where it gives them)."""
    plt = _plt()
    backbones = _backbones(sweep.variants)
    fig, ax = plt.subplots(figsize=(1.8 + 1.8 * len(backbones), 4.2))
    width = 0.38
    for j, frontend in enumerate(("raw", "mel")):
        for i, b in enumerate(backbones):
            v = f"{b}-{frontend}"
            if (dataset, v) not in sweep.cells:
                continue
            x = i + (j - 0.5) * width
            cell = sweep.cell(dataset, v)
            mean, std = cell.best_mean_std()
            if mean is not None:
                ax.bar(x, 100 * mean, width, yerr=100 * std if std else None, capsize=4,
                       color=FRONTEND_COLORS[frontend], label=_once(ax, frontend))
                # inside the bar at its base: the paper's ◆ near the top never covers it
                ax.text(x, 2, f"{100 * mean:.1f}\n{best_epoch_text(cell)}", ha="center", va="bottom",
                        fontsize=7, color="white", fontweight="bold", gid=f"best_epoch:{v}")
            else:
                ax.text(x, 1, cell_summary(cell), rotation=90, ha="center", va="bottom", fontsize=8)
            p = PAPER_RESULTS.get(paper_key(dataset) or "", {}).get(v)
            if p is not None and p.acc is not None:
                ax.errorbar(x, p.acc, yerr=p.std, fmt="D", color="black", ms=5, capsize=3, label=_once(ax, "paper"))
                if p.epochs is not None:
                    ax.annotate(f"{p.epochs} ep", (x, p.acc), fontsize=6, xytext=(5, 2), textcoords="offset points")
    ax.set_xticks(range(len(backbones)), [BACKBONE_TITLES.get(b, b) for b in backbones])
    ax.set_ylabel("best test accuracy (%)")
    ax.set_ylim(0, 108)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"{dataset_title(dataset)}: raw vs mel (label: accuracy, best epoch)", fontsize=10)
    ax.legend(fontsize=7, loc="upper right", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------------
# Figures 4-7: training curves
# ----------------------------------------------------------------------------------------------

def smoothed_curves_figure(sweep: Sweep, dataset: str):
    """Test accuracy per epoch of each variant on fold 1 (or the split): faint raw values, the 7-epoch
    moving average as the line, the run's best test accuracy as a dotted horizontal line."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.4))
    folds = set()
    for k, v in enumerate(sweep.variants):
        t = sweep.cell(dataset, v).first_fold()
        h = t.history.get(S.TEST_ACC) if t else None
        if not h:
            continue
        folds.add(t.fold)
        epochs, acc = [s for s, _ in h], [100 * y for _, y in h]
        color, style = _color(v, k), FRONTEND_STYLES.get(split_variant(v)[1], ":")
        ax.plot(epochs, acc, style, color=color, lw=0.7, alpha=0.3)
        ax.plot(epochs, smooth(acc), style, color=color, lw=1.8, label=v, gid=f"smoothed:{v}")
        if t.best is not None:
            best_epoch = f", ep {t.best_epoch}" if t.best_epoch is not None else ""
            ax.axhline(100 * t.best, color=color, ls=BEST_STYLES.get(split_variant(v)[1], ":"), lw=1, gid=f"best:{v}",
                       label=f"best {v}: {100 * t.best:.2f}{best_epoch}")
    view = "fold 1" if folds == {"1"} else ", ".join(f"fold {f}" if f.isdigit() else f for f in sorted(folds))
    ax.set_title(f"{dataset_title(dataset)}: test accuracy ({view or 'no runs'})\n"
                 f"thick = {SMOOTH_EPOCHS}-epoch moving average, faint = per epoch, thin horizontal = best", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def curves_figure(sweep: Sweep, dataset: str):
    """Per variant: test accuracy per epoch of each fold (solid), train accuracy (dashed), val accuracy (dotted)."""
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
    fig.suptitle(f"{dataset_title(dataset)}: test (solid), train (dashed), validation (dotted) accuracy, every fold")
    return fig


def _save(fig, path: Path, dpi: int = 100) -> Path:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # keeps titles and outside legends in the image
    plt.close(fig)
    return path


# Which paper figure a dataset's bars and curves reproduce (the paper's datasets; others have none).
PAPER_BAR_FIGURE = {"esc50": 2, "speechcommands": 3}
PAPER_CURVE_FIGURE = {"esc50": 4, "speechcommands": 5, "speechcommands-concat": 6, "voxpopuli": 7}


def _caption(number: int | None, text: str) -> str:
    return f"Figure {number} · {text}" if number else text


def study_figures(sweep: Sweep, outdir: Path) -> list[tuple[str, Path]]:
    """Write every figure into outdir; returns (caption, path) pairs in the paper's order."""
    outdir.mkdir(parents=True, exist_ok=True)
    figs = [(_caption(1, "accuracy, raw − mel gap and HELIX − pure Mamba by sequence length"),
             _save(length_figure(sweep), outdir / "accuracy_vs_length.png"))]
    for d in sweep.datasets:
        figs.append((_caption(PAPER_BAR_FIGURE.get(paper_key(d) or ""), f"{dataset_title(d)}: accuracy, raw vs mel, "
                              "best epochs"), _save(accuracy_bars_figure(sweep, d), outdir / f"accuracy_{slug(d)}.png")))
    for d in sweep.datasets:
        figs.append((_caption(PAPER_CURVE_FIGURE.get(paper_key(d) or ""), f"{dataset_title(d)}: test accuracy curves "
                              f"(fold 1, {SMOOTH_EPOCHS}-epoch smoothing, best lines)"),
                     _save(smoothed_curves_figure(sweep, d), outdir / f"curves_smoothed_{slug(d)}.png")))
    figs.append(("Raw-minus-mel gap per backbone (panel b of Figure 1, larger)",
                 _save(gap_figure(sweep), outdir / "gap_raw_minus_mel.png")))
    for d in sweep.datasets:
        figs.append((f"{dataset_title(d)}: training curves of every fold",
                     _save(curves_figure(sweep, d), outdir / f"curves_{slug(d)}.png", dpi=90)))
    return figs
