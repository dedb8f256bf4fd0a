"""The study's tables and figures, regenerated from a sweep's MLflow runs.

    python -m helix_sweep.report [experiment=NAME] [tracking_uri=URI] [workdir=DIR] [out=dashboards]

reads the experiment's runs through the MLflow client and writes into <out>/<experiment>/:

    index.html                 self-contained page: every table and figure (embedded), links to the files
    tables/<name>.md, .html    fold tables (ESC-50 style, mean ± std over folds), single-split tables
                               (Speech Commands style, with epochs reached), long-memory (concat) and
                               speaker-ID tables, the feasibility table; each beside the paper's numbers
    figures/*.png              accuracy bars raw vs mel (fold error bars), raw-minus-mel gap per backbone,
                               training curves per variant, accuracy vs sequence length
    trials.csv                 one row per trial run (the numbers every table is built from)

What it reads (the schema the trial workers log, see helix_sweep/sweep/tracking.py): runs tagged
kind=trial with tags dataset, variant, fold ("1".."10" or "split"), status, trial_key; metrics with
step = epoch: best_test_acc, test_acc, train_acc, train_loss, val_acc, test_acc_at_best_val,
epoch_seconds, peak_mem_mb, epochs_done, best_epoch; params tokens_per_clip, pool_tokens, frontend.
Parent runs (kind=parent) may carry `folds_planned`, so folds not started yet show as pending.

Numbers: accuracies are stored as fractions and shown in percent. Fold aggregates are the mean and the
sample standard deviation (ddof=1) of the per-fold best test accuracy, over finished folds only; a
partial aggregate says how many folds it covers. "best test" selects the epoch on the test set, as the
paper does; where a validation split exists, "test @ best val" is the test accuracy at the epoch with
the best validation accuracy, the unbiased figure.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from helix_sweep.sweep.tracking import fold_sort_key, mean_std, parent_runs, trial_runs

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The paper's numbers (SPEC "Results to compare against"); best test accuracy in percent.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperResult:
    acc: float | None  # percent; None when the run did not finish (see status)
    std: float | None = None  # over folds, when the dataset has folds
    epochs: int | None = None  # epochs reached, where the paper says
    status: str = "finished"  # or "oom"


PAPER_RESULTS: dict[str, dict[str, PaperResult]] = {
    "esc50": {
        "mamba-raw": PaperResult(55.10, 3.33), "mamba-mel": PaperResult(53.75, 2.92),
        "helix-raw": PaperResult(50.20, 3.71), "helix-mel": PaperResult(51.85, 2.41),
        "attention-raw": PaperResult(44.60, 3.16), "attention-mel": PaperResult(46.10, 2.97),
    },
    "speechcommands": {
        "mamba-raw": PaperResult(90.27, epochs=76), "mamba-mel": PaperResult(92.36, epochs=86),
        "helix-raw": PaperResult(92.94, epochs=81), "helix-mel": PaperResult(92.44, epochs=94),
        "attention-raw": PaperResult(82.43, epochs=100), "attention-mel": PaperResult(91.27, epochs=100),
    },
    "speechcommands-concat": {
        "helix-raw": PaperResult(91.31, epochs=24), "mamba-raw": PaperResult(89.81, epochs=24),
    },
    "voxpopuli": {
        "helix-raw": PaperResult(85.07), "mamba-raw": PaperResult(73.55),
        "attention-raw": PaperResult(None, status="oom"),
    },
}

# Feasibility on one 48 GB GPU, as the paper states it, by dataset.
PAPER_FEASIBILITY: dict[str, str] = {
    "esc50": "500 tokens: all three backbones train",
    "librispeech": "3,000 tokens: pure attention slow (>2x pure Mamba's wall time)",
    "voxpopuli": "30,000 tokens: pure attention out of memory",
}

DATASET_TITLES = {
    "esc50": "ESC-50", "urbansound8k": "UrbanSound8K", "speechcommands": "Speech Commands v2",
    "speechcommands-concat": "Concat Speech Commands", "librispeech": "LibriSpeech speaker ID (30 s)",
    "voxpopuli": "VoxPopuli speaker ID (300 s)",
}
BACKBONE_TITLES = {"mamba": "pure Mamba", "helix": "HELIX", "attention": "pure attention"}
VARIANT_ORDER = ["mamba-raw", "mamba-mel", "helix-raw", "helix-mel", "attention-raw", "attention-mel"]
DATASET_ORDER = ["esc50", "urbansound8k", "speechcommands", "speechcommands-concat", "librispeech", "voxpopuli"]
CURVE_METRICS = ("train_loss", "train_acc", "test_acc", "val_acc", "epoch_seconds", "peak_mem_mb")

# How a status tag reads in a table cell.
STATUS_TEXT = {"finished": "done", "running": "running", "oom": "OOM", "planned_oom": "planned OOM",
               "diverged": "diverged", "failed": "failed", None: "pending"}


def paper_key(dataset: str) -> str | None:
    """The PAPER_RESULTS key a dataset name compares against (librispeech-speakers -> librispeech)."""
    for key in sorted(set(PAPER_RESULTS) | set(PAPER_FEASIBILITY), key=len, reverse=True):
        if dataset == key or dataset.startswith(key + "-"):  # longest key first: -concat beats speechcommands
            return key
    return None


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


# --------------------------------------------------------------------------------------------
# What the runs hold
# --------------------------------------------------------------------------------------------


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

    @property
    def best(self) -> float | None:
        return self.metrics.get("best_test_acc")

    @property
    def at_best_val(self) -> float | None:
        return self.metrics.get("test_acc_at_best_val")

    @property
    def epochs(self) -> int | None:
        """Epochs reached: the final `epochs_done`, else the last epoch with a test accuracy."""
        if "epochs_done" in self.metrics:
            return int(self.metrics["epochs_done"])
        steps = [s for s, _ in self.history.get("test_acc", [])]
        return max(steps) if steps else None

    @property
    def tokens(self) -> int | None:
        value = self.params.get("tokens_per_clip")
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
        return [self.trials[f] for f in self.folds if f in self.trials and self.trials[f].status == "finished"
                and self.trials[f].best is not None]

    def best_mean_std(self) -> tuple[float | None, float | None]:
        return mean_std([t.best for t in self.finished])

    def at_best_val_mean_std(self) -> tuple[float | None, float | None]:
        done = self.finished
        values = [t.at_best_val for t in done if t.at_best_val is not None]
        return mean_std(values) if done and len(values) == len(done) else (None, None)

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


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(order)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(order)), n))


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    # One value per epoch; a resumed worker that re-logged an epoch leaves the later value.
    by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
    return sorted(by_step.items())


def load_sweep(client, experiment: str, histories: bool = True) -> Sweep:
    """Read an experiment's trial and parent runs into a Sweep (histories for the curves optional)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise SystemExit(f"experiment={experiment!r} not found at {client.tracking_uri}; "
                         f"experiments there: {', '.join(names) or 'none'}")
    trials = []
    for r in trial_runs(client, exp.experiment_id):
        tags = r.data.tags
        missing = [k for k in ("dataset", "variant") if not tags.get(k)]
        if missing:
            log.warning("Skipping trial run %s: no %s tag", r.info.run_id, " or ".join(missing))
            continue
        t = Trial(run_id=r.info.run_id, key=tags.get("trial_key", r.info.run_name or r.info.run_id),
                  dataset=tags["dataset"], variant=tags["variant"], fold=tags.get("fold", "split"),
                  status=tags.get("status"), params=dict(r.data.params), metrics=dict(r.data.metrics))
        if histories:
            t.history = {k: _history(client, t.run_id, k) for k in CURVE_METRICS if k in t.metrics}
        trials.append(t)

    parents = {(p.data.tags.get("dataset"), p.data.tags.get("variant")): p for p in parent_runs(client, exp.experiment_id)}
    pairs = {(t.dataset, t.variant) for t in trials} | {k for k in parents if None not in k}
    datasets = _ordered((d for d, _ in pairs), DATASET_ORDER)
    variants = _ordered((v for _, v in pairs), VARIANT_ORDER)
    seen_folds: dict[str, set[str]] = {}
    for t in trials:
        seen_folds.setdefault(t.dataset, set()).add(t.fold)

    cells = {}
    for d in datasets:
        for v in variants:
            parent = parents.get((d, v))
            planned = parent.data.tags.get("folds_planned") if parent else None
            folds = planned.split(",") if planned else seen_folds.get(d) or ["split"]
            mine = {t.fold: t for t in trials if t.dataset == d and t.variant == v}
            folds = sorted(set(folds) | set(mine), key=fold_sort_key)
            cells[(d, v)] = Cell(d, v, folds, mine, dict(parent.data.metrics) if parent else {})
    return Sweep(exp.name, exp.experiment_id, client.tracking_uri, datasets, variants, cells, trials)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def pm(mean: float | None, std: float | None) -> str:
    """'55.10 ± 3.33' in percent from fractions (no ± part for a single value)."""
    if mean is None:
        return ""
    return pct(mean) if std is None else f"{pct(mean)} ± {pct(std)}"


def trial_text(t: Trial | None) -> str:
    """A fold cell: the best test accuracy of a finished trial, otherwise its status."""
    if t is None:
        return "pending"
    if t.status == "finished" and t.best is not None:
        return pct(t.best)
    text = STATUS_TEXT.get(t.status, t.status or "pending")
    if t.status == "running" and t.epochs:
        text += f" (ep {t.epochs})"
    return text


def cell_summary(cell: Cell) -> str:
    """The aggregate cell: mean ± std over finished folds, or why there is none yet."""
    counts = cell.statuses()
    n, k = len(cell.finished), len(cell.folds)
    if n:
        text = pm(*cell.best_mean_std())
        return text if n == k else f"{text} ({n}/{k} folds)"
    terminal = [s for s in counts if s not in ("running", None)]
    if len(counts) == 1 and terminal:
        return STATUS_TEXT.get(terminal[0], terminal[0])
    if counts.get("running"):
        return "running"
    return ", ".join(f"{STATUS_TEXT.get(s, s)} {c}" for s, c in counts.items()) if terminal else "pending"


def paper_text(dataset: str, variant: str) -> str:
    key = paper_key(dataset)
    p = PAPER_RESULTS.get(key or "", {}).get(variant)
    if p is None:
        return ""
    if p.acc is None:
        return STATUS_TEXT.get(p.status, p.status)
    text = f"{p.acc:.2f}" + (f" ± {p.std:.2f}" if p.std is not None else "")
    return text + (f" ({p.epochs} ep)" if p.epochs is not None else "")


def delta_text(dataset: str, variant: str, mean: float | None) -> str:
    p = PAPER_RESULTS.get(paper_key(dataset) or "", {}).get(variant)
    if p is None or p.acc is None or mean is None:
        return ""
    return f"{100 * mean - p.acc:+.2f}"


@dataclass
class Table:
    name: str  # file stem
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # the numbers behind the rows

    def column(self, name: str) -> dict[str, str]:
        """{row label: text} of one column (the first column labels the rows)."""
        i = self.header.index(name)
        return {row[0]: row[i] for row in self.rows}

    def to_markdown(self) -> str:
        def esc(s: str) -> str:
            return str(s).replace("|", "\\|")

        lines = [f"### {self.title}", "", "| " + " | ".join(esc(h) for h in self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f'<td class="{_css(c)}">{html.escape(c)}</td>' for c in row) + "</tr>"
                       for row in self.rows)
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (f'<section class="table" id="{html.escape(self.name)}"><h3>{html.escape(self.title)}</h3>'
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                + (f"<ul class=notes>{notes}</ul>" if notes else "") + "</section>")


def _css(text: str) -> str:
    t = text.lower()
    for word, cls in (("pending", "pending"), ("oom", "oom"), ("diverged", "diverged"), ("failed", "failed"),
                      ("running", "running")):
        if word in t:
            return cls
    return "num" if re.match(r"^[+-]?\d", t) else ""


NOTE_BEST = ("best test = best test accuracy over epochs (selects the epoch on the test set, as the paper does); "
             "test @ best val = test accuracy at the epoch with the best validation accuracy.")
NOTE_STD = "mean ± sample std (ddof=1) over finished folds of the per-fold best test accuracy, in %."


def _title(dataset: str) -> str:
    return DATASET_TITLES.get(dataset, dataset)


def fold_table(sweep: Sweep, dataset: str) -> Table:
    """ESC-50 style: one row per variant, a column per fold, mean ± std, the paper beside it."""
    cells = [sweep.cell(dataset, v) for v in sweep.variants]
    folds = sorted({f for c in cells for f in c.folds}, key=fold_sort_key)
    with_val = any(t.at_best_val is not None for c in cells for t in c.trials.values())
    header = ["variant"] + [f"fold {f}" for f in folds] + ["mean ± std"]
    header += ["test @ best val"] if with_val else []
    has_paper = paper_key(dataset) in PAPER_RESULTS
    header += ["paper", "Δ vs paper"] if has_paper else []
    rows, records = [], []
    for c in cells:
        mean, std = c.best_mean_std()
        vmean, vstd = c.at_best_val_mean_std()
        row = [c.variant] + [trial_text(c.trials.get(f)) if f in c.folds else "" for f in folds] + [cell_summary(c)]
        row += [pm(vmean, vstd)] if with_val else []
        row += [paper_text(dataset, c.variant), delta_text(dataset, c.variant, mean)] if has_paper else []
        rows.append(row)
        records.append({"dataset": dataset, "variant": c.variant, "mean": mean, "std": std,
                        "n_done": len(c.finished), "n_folds": len(c.folds),
                        "at_best_val_mean": vmean, "at_best_val_std": vstd,
                        "folds": {f: (t.best if t.status == "finished" else t.status) for f, t in c.trials.items()}})
    notes = [NOTE_STD] + ([NOTE_BEST] if with_val else [])
    if paper_key(dataset):
        notes.append("paper: SPEC 'Results to compare against' (best test accuracy, %); Δ = ours − paper in points.")
    return Table(f"folds_{_slug(dataset)}", f"{_title(dataset)}: best test accuracy per fold (%)",
                 header, rows, notes, records)


def single_table(sweep: Sweep, dataset: str) -> Table:
    """Speech Commands style (also long-memory and speaker ID): one split, epochs reached."""
    kind = sweep.kind(dataset)
    cells = [sweep.cell(dataset, v) for v in sweep.variants]
    trials = [(c, next(iter(c.trials.values()), None)) for c in cells]
    multi = [c for c in cells if len(c.folds) > 1]
    if multi:
        log.warning("%s has %d folds but is reported as a single split; using the mean over folds", dataset,
                    len(multi[0].folds))
    with_val = any(t is not None and t.at_best_val is not None for _, t in trials)
    long_seq = kind in ("long_memory", "speaker")
    header = ["variant"] + (["tokens/clip", "pool K"] if long_seq else []) + ["best test"]
    header += ["test @ best val"] if with_val else []
    has_paper = paper_key(dataset) in PAPER_RESULTS
    header += ["epochs reached", "best epoch", "status"] + (["paper", "Δ vs paper"] if has_paper else [])
    rows, records = [], []
    for c, t in trials:
        mean, _ = c.best_mean_std()
        vmean, _ = c.at_best_val_mean_std()
        best_text = pm(mean, None) if c.finished else cell_summary(c)
        row = [c.variant]
        if long_seq:
            row += [_int(t.tokens) if t else "", (t.params.get("pool_tokens", "") if t else "")]
        row += [best_text] + ([pct(vmean)] if with_val else [])
        best_epoch = t.metrics.get("best_epoch") if t else None
        row += [_int(t.epochs) if t else "", _int(best_epoch), STATUS_TEXT.get(t.status, t.status) if t else "pending"]
        row += [paper_text(dataset, c.variant), delta_text(dataset, c.variant, mean)] if has_paper else []
        rows.append(row)
        records.append({"dataset": dataset, "variant": c.variant, "best": mean, "at_best_val": vmean,
                        "epochs": t.epochs if t else None, "status": t.status if t else None})
    what = {"single": "single split", "long_memory": "long memory (concatenated clips, label of the first)",
            "speaker": "speaker ID"}[kind]
    notes = ([NOTE_BEST] if with_val else []) + ["epochs reached = epochs trained (the paper's runs stopped early "
                                                 "where compute ran out); best epoch = epoch of the best test."]
    if paper_key(dataset):
        notes.append("paper: SPEC 'Results to compare against' (best test accuracy, %, epochs reached).")
    return Table(f"{kind}_{_slug(dataset)}", f"{_title(dataset)}: {what}, best test accuracy (%)",
                 header, rows, notes, records)


def feasibility_table(sweep: Sweep) -> Table:
    """Which variants train at which sequence length: status, s/epoch (x pure Mamba), peak memory."""
    has_paper = any(paper_key(d) in PAPER_FEASIBILITY for d in sweep.datasets)
    header = ["dataset", "tokens/clip (raw / mel)"] + sweep.variants + (["paper"] if has_paper else [])
    rows, records = [], []

    def longest(d: str) -> float:
        tokens = [n for v in sweep.variants if (n := sweep.cell(d, v).tokens()) is not None]
        return max(tokens, default=math.inf)

    for d in sorted(sweep.datasets, key=longest):  # rows by sequence length
        cells = {v: sweep.cell(d, v) for v in sweep.variants}
        by_frontend: dict[str, int] = {}
        for v, c in cells.items():
            if c.tokens() is not None:
                by_frontend.setdefault(split_variant(v)[1], c.tokens())
        tokens = " / ".join(f"{by_frontend[f]:,}" for f in ("raw", "mel") if f in by_frontend) or \
            " / ".join(f"{n:,}" for n in by_frontend.values())
        row = [d, tokens]
        for v, c in cells.items():
            secs = _mean([t.mean_of("epoch_seconds") for t in c.trials.values()])
            backbone, frontend = split_variant(v)
            ref = cells.get(f"mamba-{frontend}")
            ref_secs = _mean([t.mean_of("epoch_seconds") for t in ref.trials.values()]) if ref and backbone != "mamba" else None
            peak = max([m for t in c.trials.values() if (m := t.max_of("peak_mem_mb")) is not None], default=None)
            row.append(_feasibility_text(c, secs, ref_secs, peak))
            records.append({"dataset": d, "variant": v, "statuses": dict(c.statuses()), "epoch_seconds": secs,
                            "peak_mem_mb": peak})
        if has_paper:
            row.append(PAPER_FEASIBILITY.get(paper_key(d) or "", ""))
        rows.append(row)
    notes = ["ok = every planned trial finished; s/ep = mean epoch wall time; ×Mamba = relative to pure Mamba "
             "with the same frontend; MB = peak accelerator (or process) memory.",
             "OOM = ran out of memory; planned OOM = not launched because the plan predicts out of memory; "
             "diverged = stopped after repeated non-finite losses."]
    return Table("feasibility", "Feasibility by sequence length", header, rows, notes, records)


def _feasibility_text(cell: Cell, secs: float | None, ref_secs: float | None, peak: float | None) -> str:
    counts = cell.statuses()
    if cell.complete:
        status = "ok"
    elif len(counts) == 1:
        status = STATUS_TEXT.get(next(iter(counts)), next(iter(counts)))
    else:
        order = ["finished", "running", "oom", "planned_oom", "diverged", "failed", None]
        status = ", ".join(f"{STATUS_TEXT.get(s, s)} {counts[s]}/{len(cell.folds)}"
                           for s in sorted(counts, key=lambda s: order.index(s) if s in order else len(order)))
    parts = [status]
    if secs is not None:
        parts.append(f"{secs:.1f} s/ep" + (f" ({secs / ref_secs:.1f}× Mamba)" if ref_secs else ""))
    if peak is not None:
        parts.append(f"{peak:,.0f} MB")
    return " · ".join(parts)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _int(x: float | None) -> str:
    return "" if x is None else str(int(x))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "x"


def study_tables(sweep: Sweep) -> list[Table]:
    """Every table of the study, in reading order: folds, single split, long memory, speaker ID, feasibility."""
    order = {"folds": 0, "single": 1, "long_memory": 2, "speaker": 3}
    tables = []
    for d in sorted(sweep.datasets, key=lambda d: order[sweep.kind(d)]):
        tables.append(fold_table(sweep, d) if sweep.kind(d) == "folds" else single_table(sweep, d))
    tables.append(feasibility_table(sweep))
    return tables


def summary_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """Best test accuracy per (dataset, variant): mean, sample std, folds done, status (for CSV output)."""
    out = []
    for (d, v), c in sweep.cells.items():
        mean, std = c.best_mean_std()
        out.append({"dataset": d, "variant": v, "best_test_acc_mean": mean, "best_test_acc_std": std,
                    "n_folds_done": len(c.finished), "n_folds": len(c.folds), "summary": cell_summary(c)})
    return out


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


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
    ax.set_title(f"{_title(dataset)}: raw vs mel")
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
    fig.suptitle(f"{_title(dataset)}: test (solid), train (dashed), validation (dotted) accuracy")
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
            elif {"oom", "planned_oom"} & set(c.statuses()):
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
        figs.append((f"{_title(d)}: accuracy, raw vs mel", plot_accuracy_bars(sweep, d, outdir / f"accuracy_{_slug(d)}.png")))
    figs.append(("Raw-minus-mel gap per backbone", plot_gap(sweep, outdir / "gap_raw_minus_mel.png")))
    figs.append(("Accuracy vs sequence length", plot_accuracy_vs_length(sweep, outdir / "accuracy_vs_length.png")))
    for d in sweep.datasets:
        figs.append((f"{_title(d)}: training curves", plot_curves(sweep, d, outdir / f"curves_{_slug(d)}.png")))
    return figs


# --------------------------------------------------------------------------------------------
# Writing the dashboard
# --------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1300px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f0f0f0} td:first-child{text-align:left;font-weight:600}
td.pending{color:#888;font-style:italic} td.oom{background:#fde2e2;color:#a00}
td.diverged{background:#fff0d8;color:#960} td.failed{background:#fde2e2} td.running{color:#06c}
ul.notes{font-size:.8em;color:#555;margin:.3em 0 1.2em} figure{display:inline-block;margin:.5em}
figure img{max-width:100%;border:1px solid #ddd} figcaption{font-size:.85em}
code{background:#f4f4f4;padding:0 .2em}
"""


def write_trials_csv(sweep: Sweep, path: Path) -> Path:
    cols = ["trial_key", "dataset", "variant", "fold", "status", "best_test_acc", "test_acc_at_best_val",
            "epochs", "best_epoch", "tokens_per_clip", "run_id"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for t in sorted(sweep.trials, key=lambda t: (t.dataset, t.variant, fold_sort_key(t.fold))):
            w.writerow([t.key, t.dataset, t.variant, t.fold, t.status or "", _num(t.best), _num(t.at_best_val),
                        _int(t.epochs), _int(t.metrics.get("best_epoch")), _int(t.tokens), t.run_id])
    return path


def _num(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def _ui_url(sweep: Sweep) -> str | None:
    if sweep.tracking_uri.startswith(("http://", "https://")):
        # workflowType opens MLflow 3's model-training runs table instead of its GenAI overview
        return f"{sweep.tracking_uri.rstrip('/')}/#/experiments/{sweep.experiment_id}/runs?workflowType=machine_learning"
    return None


def write_report(sweep: Sweep, out: Path) -> Path:
    """Write tables, figures, trials.csv and index.html into out/<experiment>/; returns index.html."""
    root = Path(out) / _slug(sweep.experiment)
    (root / "tables").mkdir(parents=True, exist_ok=True)
    tables = study_tables(sweep)
    for t in tables:
        (root / "tables" / f"{t.name}.md").write_text(t.to_markdown())
        (root / "tables" / f"{t.name}.html").write_text(_page(t.title, f"<style>{CSS}</style>" + t.to_html()))
    (root / "tables.md").write_text(f"# {sweep.experiment}: tables\n\n" + "\n".join(t.to_markdown() for t in tables))
    figures = study_figures(sweep, root / "figures")
    write_trials_csv(sweep, root / "trials.csv")

    counts = Counter(t.status or "unknown" for t in sweep.trials)
    ui = _ui_url(sweep)
    parts = [f"<style>{CSS}</style>", f"<h1>{html.escape(sweep.experiment)}</h1>",
             "<p>" + f"{len(sweep.trials)} trial runs: " + html.escape(", ".join(f"{s} {n}" for s, n in sorted(counts.items())))
             + f" &middot; {len(sweep.datasets)} datasets &times; {len(sweep.variants)} variants"
             + f" &middot; generated {time.strftime('%Y-%m-%d %H:%M:%S')} from <code>{html.escape(sweep.tracking_uri)}</code>"
             + (f' &middot; <a href="{html.escape(ui)}">MLflow experiment</a>' if ui else "") + "</p>",
             "<p>Files: " + " ".join(f'<a href="tables/{t.name}.md">{t.name}.md</a> (<a href="tables/{t.name}.html">html</a>)'
                                     for t in tables) + ' <a href="tables.md">tables.md</a> <a href="trials.csv">trials.csv</a></p>',
             "<h2>Tables</h2>"] + [t.to_html() for t in tables] + ["<h2>Figures</h2>"]
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        rel = path.relative_to(root).as_posix()
        parts.append(f'<figure><a href="{rel}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"></a>'
                     f"<figcaption>{html.escape(caption)} (<a href=\"{rel}\">{rel}</a>)</figcaption></figure>")
    index = root / "index.html"
    index.write_text(_page(f"{sweep.experiment}: HELIX sweep report", "\n".join(parts)))
    log.info("Wrote %s (%d tables, %d figures)", index, len(tables), len(figures))
    return index


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"</head><body>\n{body}\n</body></html>\n")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

KEYS = {"experiment": "experiment name (default: the only experiment with trial runs)",
        "tracking_uri": "MLflow tracking URI (default: the work directory's local server, started if needed)",
        "workdir": "work directory of the local server (default: $HELIX_WORKDIR or ./helix_work)",
        "out": "output folder (default: dashboards)"}


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"bad argument {item!r}: expected key=value with key one of "
                             + ", ".join(f"{k} ({d})" for k, d in KEYS.items()))
        args[key] = value
    return args


def _pick_experiment(client) -> str:
    names = [e.name for e in client.search_experiments()
             if client.search_runs([e.experiment_id], "tags.kind = 'trial'", max_results=1)]
    if len(names) != 1:
        raise SystemExit("give experiment=NAME; experiments with trial runs at "
                         f"{client.tracking_uri}: {', '.join(sorted(names)) or 'none'}")
    return names[0]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mlflow.tracking import MlflowClient

    from helix_sweep.sweep.tracking import check_tracking_reachable, default_workdir, ensure_tracking_server

    uri = args.get("tracking_uri") or ensure_tracking_server(Path(args.get("workdir") or default_workdir()))
    check_tracking_reachable(uri)
    client = MlflowClient(uri)
    sweep = load_sweep(client, args.get("experiment") or _pick_experiment(client))
    index = write_report(sweep, Path(args.get("out", "dashboards")))
    print(f"report: {index}")
    if _ui_url(sweep):
        print(f"MLflow UI: {_ui_url(sweep)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
