"""The study's tables from a Sweep: fold tables (ESC-50 style), single-split tables (Speech
Commands style, also long-memory and speaker ID), the feasibility table; each as markdown and HTML,
beside the paper's numbers. Pure functions of the Sweep."""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from helix_sweep.report.paper import (PAPER_DATASET_NOTES, PAPER_FEASIBILITY, PAPER_FEASIBILITY_CELLS, PAPER_RESULTS,
                                      PAPER_TABLE, SLOW_FACTOR, dataset_title, paper_key)
from helix_sweep.report.results import Cell, Sweep, Trial, split_variant
from helix_sweep.sweep import schema as S

log = logging.getLogger(__name__)

# How a status tag reads in a table cell.
STATUS_TEXT = {S.FINISHED: "done", S.RUNNING: "running", S.OOM: "OOM", S.PLANNED_OOM: "planned OOM",
               S.RULED_OOM: "ruled OOM", S.DIVERGED: "diverged", S.FAILED: "failed", None: "pending"}


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
    if t.status == S.FINISHED and t.best is not None:
        return pct(t.best)
    text = STATUS_TEXT.get(t.status, t.status or "pending")
    if t.status == S.RUNNING and t.epochs:
        text += f" (ep {t.epochs})"
    return text


NOT_IN_SWEEP = "—"  # a dataset x variant the grid does not run (no parent run, no trial)


def cell_summary(cell: Cell) -> str:
    """The aggregate cell: mean ± std over finished folds, or why there is none yet."""
    if not cell.folds:
        return NOT_IN_SWEEP
    counts = cell.statuses()
    n, k = len(cell.finished), len(cell.folds)
    if n:
        text = pm(*cell.best_mean_std())
        return text if n == k else f"{text} ({n}/{k} folds)"
    terminal = [s for s in counts if s not in (S.RUNNING, None)]
    if len(counts) == 1 and terminal:
        return STATUS_TEXT.get(terminal[0], terminal[0])
    if counts.get(S.RUNNING):
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
    wrap: bool = False  # HTML: break cells at " · " into lines (keeps wide tables within the page)

    def column(self, name: str) -> dict[str, str]:
        """{row label: text} of one column (the first column labels the rows)."""
        i = self.header.index(name)
        return {row[0]: row[i] for row in self.rows}

    def to_markdown(self) -> str:
        def esc(s: str) -> str:
            text = str(s).replace("|", "\\|")
            return text.replace(" · ", "<br>") if self.wrap else text  # GitHub renders <br> inside a cell

        lines = [f"### {self.title}", "", "| " + " | ".join(esc(h) for h in self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def to_html(self) -> str:
        def text(c: str) -> str:
            return "<br>".join(html.escape(part) for part in c.split(" · ")) if self.wrap else html.escape(c)

        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f'<td class="{_css(c)}">{text(c)}</td>' for c in row) + "</tr>"
                       for row in self.rows)
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (f'<section class="table" id="{html.escape(self.name)}"><h3>{html.escape(self.title)}</h3>'
                f"<table{' class=wrap' if self.wrap else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                + (f"<ul class=notes>{notes}</ul>" if notes else "") + "</section>")


def _css(text: str) -> str:
    t = text.lower()
    for word, cls in (("pending", "pending"), ("ruled", "ruled"), ("oom", "oom"), ("diverged", "diverged"),
                      ("failed", "failed"), ("running", "running")):
        if word in t:
            return cls
    return "num" if re.match(r"^[+-]?\d", t) else ""


NOTE_BEST = ("best test = best test accuracy over epochs (selects the epoch on the test set, as the paper does); "
             "test @ best val = test accuracy at the epoch with the best validation accuracy.")
NOTE_STD = "mean ± sample std (ddof=1) over finished folds of the per-fold best test accuracy, in %."
NOTE_FINAL = "final = test accuracy of the last epoch trained (the paper's Final Acc)."


def fold_table(sweep: Sweep, dataset: str) -> Table:
    """ESC-50 style: one row per variant, a column per fold, mean ± std, the paper beside it."""
    cells = [sweep.cell(dataset, v) for v in sweep.variants]
    folds = sorted({f for c in cells for f in c.folds}, key=S.fold_sort_key)
    with_val = any(t.at_best_val is not None for c in cells for t in c.trials.values())
    header = ["variant"] + [f"fold {f}" for f in folds] + ["mean ± std", "final mean ± std"]
    header += ["test @ best val"] if with_val else []
    has_paper = paper_key(dataset) in PAPER_RESULTS
    header += ["paper", "Δ vs paper"] if has_paper else []
    rows, records = [], []
    for c in cells:
        mean, std = c.best_mean_std()
        vmean, vstd = c.at_best_val_mean_std()
        fmean, fstd = c.final_mean_std()
        row = [c.variant] + [trial_text(c.trials.get(f)) if f in c.folds else "" for f in folds] + [cell_summary(c)]
        row += [pm(fmean, fstd)] + ([pm(vmean, vstd)] if with_val else [])
        row += [paper_text(dataset, c.variant), delta_text(dataset, c.variant, mean)] if has_paper else []
        rows.append(row)
        records.append({"dataset": dataset, "variant": c.variant, "mean": mean, "std": std,
                        "n_done": len(c.finished), "n_folds": len(c.folds),
                        "at_best_val_mean": vmean, "at_best_val_std": vstd, "final_mean": fmean, "final_std": fstd,
                        "folds": {f: (t.best if t.status == S.FINISHED else t.status) for f, t in c.trials.items()}})
    notes = [NOTE_STD, NOTE_FINAL] + ([NOTE_BEST] if with_val else [])
    if paper_key(dataset):
        notes.append("paper: SPEC 'Results to compare against' (best test accuracy, %); Δ = ours − paper in points.")
    return Table(f"folds_{slug(dataset)}", f"Table {PAPER_TABLE['folds']} · {dataset_title(dataset)}: best test accuracy per fold (%)",
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
    header = ["variant"] + (["tokens/clip", "pool K"] if long_seq else []) + ["best test", "final test"]
    header += ["test @ best val"] if with_val else []
    has_paper = paper_key(dataset) in PAPER_RESULTS
    header += ["epochs reached", "best epoch", "status"] + (["paper", "Δ vs paper"] if has_paper else [])
    rows, records = [], []
    for c, t in trials:
        mean, _ = c.best_mean_std()
        vmean, _ = c.at_best_val_mean_std()
        fmean, _ = c.final_mean_std()
        best_text = pm(mean, None) if c.finished else cell_summary(c)
        row = [c.variant]
        if long_seq:
            row += [int_text(t.tokens) if t else "", (t.params.get(S.POOL_TOKENS, "") if t else "")]
        row += [best_text, pct(fmean)] + ([pct(vmean)] if with_val else [])
        best_epoch = t.metrics.get(S.BEST_EPOCH) if t else None
        status = STATUS_TEXT.get(t.status, t.status) if t else ("pending" if c.folds else NOT_IN_SWEEP)
        row += [int_text(t.epochs) if t else "", int_text(best_epoch), status]
        row += [paper_text(dataset, c.variant), delta_text(dataset, c.variant, mean)] if has_paper else []
        rows.append(row)
        records.append({"dataset": dataset, "variant": c.variant, "best": mean, "final": fmean, "at_best_val": vmean,
                        "epochs": t.epochs if t else None, "best_epoch": t.best_epoch if t else None,
                        "status": t.status if t else None})
    what = {"single": "single split", "long_memory": "long memory (concatenated clips, label of the first)",
            "speaker": "speaker ID"}[kind]
    notes = [NOTE_FINAL] + ([NOTE_BEST] if with_val else []) + ["epochs reached = epochs trained (the paper's runs stopped early "
                                                 "where compute ran out); best epoch = epoch of the best test."]
    if paper_key(dataset):
        notes.append("paper: SPEC 'Results to compare against' (best test accuracy, %, epochs reached).")
    notes += dataset_notes(sweep, dataset)
    return Table(f"{kind}_{slug(dataset)}", f"Table {PAPER_TABLE[kind]} · {dataset_title(dataset)}: {what}, "
                 "best and final test accuracy (%)",
                 header, rows, notes, records)


def dataset_notes(sweep: Sweep, dataset: str) -> list[str]:
    """What the paper says about the dataset that these runs must be read against, with the runs' own
    subset and class count (params task.subset, num_classes), and a truncated schedule."""
    trials = [t for t in sweep.trials if t.dataset == dataset]
    notes = []
    text = PAPER_DATASET_NOTES.get(paper_key(dataset) or "")
    if text:
        subsets = sorted({t.params["task.subset"] for t in trials if t.params.get("task.subset")})
        classes = sorted({t.params[S.NUM_CLASSES] for t in trials if t.params.get(S.NUM_CLASSES)}, key=str)
        ran = (f"; these runs: {' and '.join(subsets) or 'subset not recorded'}"
               + (f", {' / '.join(classes)} classes" if classes else ""))
        notes.append(f"{dataset_title(dataset)}: {text}{ran}.")
    schedules = sorted({(t.params.get("stop_after_epochs"), t.params.get("epochs")) for t in trials
                        if t.params.get("stop_after_epochs") not in (None, "", "None")})
    for stop, epochs in schedules:
        notes.append(f"schedule: a {epochs}-epoch cosine LR schedule stopped after epoch {stop} "
                     "(train.stop_after_epochs): epochs reached counts the epochs trained.")
    return notes


def feasibility_table(sweep: Sweep) -> Table:
    """Table 1: which variants train at which sequence length: ok / slow / OOM (measured), planned OOM
    (the plan), ruled OOM (a grid rule, with the plan's verdict beside it), s/epoch (x pure Mamba), peak
    memory; rows by sequence length, the paper's cell beside ours; under it what the plan says with the
    paper's naive attention and with SDPA. Cells break into lines (HTML) so the table fits the page."""
    has_paper = any(paper_key(d) in PAPER_FEASIBILITY for d in sweep.datasets)
    header = ["dataset", "tokens (raw / mel)"] + sweep.variants + (["paper"] if has_paper else [])
    rows, records = [], []
    for d in sweep.by_length():
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
            category = feasibility_category(c, secs, ref_secs)
            row.append(_feasibility_text(c, category, secs, ref_secs, peak))
            records.append({"dataset": d, "variant": v, "statuses": dict(c.statuses()), "epoch_seconds": secs,
                            "peak_mem_mb": peak, "category": category, "plan": _plan_verdicts(c),
                            "paper": PAPER_FEASIBILITY_CELLS.get(paper_key(d) or "", {}).get(backbone)
                            if frontend == "raw" else None})
        if has_paper:
            row.append(PAPER_FEASIBILITY.get(paper_key(d) or "", ""))
        rows.append(row)
    notes = [f"ok = every planned trial finished; slow = finished, but more than {SLOW_FACTOR:g}× the epoch time of pure "
             "Mamba with the same frontend (the paper's 'slow'); s/ep = mean epoch wall time; MB = peak accelerator "
             "(or process) memory.",
             "OOM = ran out of memory; planned OOM = not launched: the plan predicts out of memory under the trial's "
             "attention implementation; ruled OOM = not launched: a grid rule keeps it out, while the plan's own "
             "verdict is shown beside it; diverged = stopped after repeated non-finite losses."]
    notes += rule_notes(sweep)
    notes += [attention_note(sweep, records), plan_note(records)]
    return Table("feasibility", f"Table {PAPER_TABLE['feasibility']} · Feasibility by sequence length", header, rows,
                 notes, records, wrap=True)


def feasibility_category(cell: Cell, secs: float | None, ref_secs: float | None) -> str | None:
    """The paper's Table 1 category of a cell: ok | slow | oom, None while it is undecided or failed otherwise."""
    counts = cell.statuses()
    if cell.complete:
        return "slow" if secs is not None and ref_secs and secs / ref_secs > SLOW_FACTOR else "ok"
    if counts.get(S.OOM) or counts.get(S.PLANNED_OOM):
        return "oom"
    if counts.get(S.RULED_OOM):
        return "ruled"  # decided by a rule, not measured or planned: not compared with the paper
    return None


def _plan_verdicts(cell: Cell) -> dict[str, str]:
    """The plan's feasibility of a cell's trials: {"own": ..., "naive": ..., "sdpa": ...} from the runs'
    plan.feasibility params (empty for runs logged before the plan's verdicts were params)."""
    for t in cell.trials.values():
        own = t.params.get(S.PLAN_FEASIBILITY)
        if own:
            return {"own": own, **{impl: t.params[S.plan_feasibility_name(impl)] for impl in ("naive", "sdpa")
                                   if t.params.get(S.plan_feasibility_name(impl))}}
    return {}


def rule_notes(sweep: Sweep) -> list[str]:
    """One note per grid rule that kept trials out: the cells and the rule's reason (stop_reason)."""
    by_reason: dict[str, list[str]] = {}
    for t in sweep.trials:
        if t.status == S.RULED_OOM:
            cell = f"{t.dataset} {t.variant}"
            cells = by_reason.setdefault(t.stop_reason or "no reason recorded", [])
            if cell not in cells:
                cells.append(cell)
    return [f"ruled OOM ({', '.join(cells)}): {reason}" for reason, cells in by_reason.items()]


def plan_note(records: list[dict[str, Any]]) -> str:
    """One sentence: the plan's Table 1 with the paper's naive attention (against the paper's cells) and
    what SDPA changes, from the runs' plan.feasibility.naive / .sdpa params."""
    planned = [r for r in records if r["plan"].get("naive") and r["plan"].get("sdpa")]
    if not planned:
        return "The runs do not record the plan's verdicts (plan.feasibility.naive / .sdpa params)."
    with_paper = [r for r in planned if r["paper"]]
    differ = [f"{r['dataset']} {r['variant']} {r['plan']['naive']} (paper {r['paper']})" for r in with_paper
              if r["plan"]["naive"] != r["paper"]]
    if not with_paper:
        naive = "no cell here has a paper entry"
    elif differ:
        naive = (f"it matches the paper's Table 1 in {len(with_paper) - len(differ)} of {len(with_paper)} cells, "
                 f"not in " + "; ".join(differ))
    else:
        naive = f"it gives the paper's Table 1 in all {len(with_paper)} cells"
    changes = [f"{r['dataset']} {r['variant']} {r['plan']['naive']} → {r['plan']['sdpa']}" for r in planned
               if r["plan"]["naive"] != r["plan"]["sdpa"]]
    sdpa = ("with SDPA " + "; ".join(changes)) if changes else "with SDPA no cell changes"
    return f"The plan (one GPU, the runs' gpu_memory_gb) with the paper's naive attention: {naive}; {sdpa}."


def attention_note(sweep: Sweep, records: list[dict[str, Any]]) -> str:
    """One sentence: the attention implementation the trials ran and where Table 1 departs from the paper."""
    impls = sorted({t.params[S.ATTENTION_IMPL] for t in sweep.trials
                    if t.params.get(S.ATTENTION_IMPL) and split_variant(t.variant)[0] != "mamba"})
    ran = f"attention ran as {' and '.join(impls)}" if impls else "the runs do not record attention_impl"
    compared = [r for r in records if r["paper"] and r["category"] in ("ok", "slow", "oom")]
    differ = [f"{r['dataset']} {r['variant']} {r['category']} (paper {r['paper']})" for r in compared
              if r["category"] != r["paper"]]
    if not compared:
        verdict = "no cell with a paper entry has a result yet"
    elif differ:
        verdict = "it departs from the paper's pattern in: " + "; ".join(differ)
    else:
        verdict = f"it matches the paper's pattern in all {len(compared)} cells with a result"
    return (f"The paper's Table 1 is naive attention (L×L weights) on one 48 GB GPU; here {ran}, and {verdict}.")


def _feasibility_text(cell: Cell, category: str | None, secs: float | None, ref_secs: float | None,
                      peak: float | None) -> str:
    if not cell.folds:
        return NOT_IN_SWEEP
    counts = cell.statuses()
    if category in ("ok", "slow"):
        status = category
    elif len(counts) == 1:
        status = STATUS_TEXT.get(next(iter(counts)), next(iter(counts)))
    else:
        order = [S.FINISHED, S.RUNNING, S.OOM, S.PLANNED_OOM, S.RULED_OOM, S.DIVERGED, S.FAILED, None]
        status = ", ".join(f"{STATUS_TEXT.get(s, s)} {counts[s]}/{len(cell.folds)}"
                           for s in sorted(counts, key=lambda s: order.index(s) if s in order else len(order)))
    parts = [status]
    if category == "ruled" and (own := _plan_verdicts(cell).get("own")):
        parts.append(f"plan: {own}")  # what the plan itself says, under the trial's attention_impl
    if secs is not None:
        parts.append(f"{secs:.1f} s/ep")
        parts += [f"({secs / ref_secs:.1f}× Mamba)"] if ref_secs else []  # own line in HTML: narrow columns
    if peak is not None:
        parts.append(f"{peak:,.0f} MB")
    return " · ".join(parts)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def int_text(x: float | None) -> str:
    return "" if x is None else str(int(x))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "x"


def study_tables(sweep: Sweep) -> list[Table]:
    """Every table of the study in the paper's order: feasibility (Table 1), folds (2), single split (3),
    long memory (4), speaker ID (5)."""
    tables = [feasibility_table(sweep)]
    for d in sorted(sweep.datasets, key=lambda d: PAPER_TABLE[sweep.kind(d)]):
        tables.append(fold_table(sweep, d) if sweep.kind(d) == "folds" else single_table(sweep, d))
    return tables


def summary_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """Best test accuracy per (dataset, variant): mean, sample std, folds done, status (for CSV output)."""
    out = []
    for (d, v), c in sweep.cells.items():
        mean, std = c.best_mean_std()
        out.append({"dataset": d, "variant": v, "best_test_acc_mean": mean, "best_test_acc_std": std,
                    "n_folds_done": len(c.finished), "n_folds": len(c.folds), "summary": cell_summary(c)})
    return out

