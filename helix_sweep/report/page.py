"""The report's files: tables/*.md and .html, tables.md, figures/, trials.csv and index.html, the
self-contained page with every table and figure embedded."""

from __future__ import annotations

import base64
import csv
import html
import logging
import time
from collections import Counter
from pathlib import Path

from helix_sweep.report.figures import study_figures
from helix_sweep.report.results import Sweep
from helix_sweep.report.tables import int_text, slug, study_tables
from helix_sweep.sweep import schema as S

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1300px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f0f0f0;white-space:normal} td:first-child{text-align:left;font-weight:600}
table.wrap{font-size:.8em} table.wrap th{white-space:normal;max-width:9em} table.wrap td{line-height:1.25}
table.wrap td:last-child{white-space:normal;max-width:11em;text-align:left}
table.wrap td:first-child{white-space:normal}
td.pending{color:#888;font-style:italic} td.oom{background:#fde2e2;color:#a00} td.ruled{background:#f1e6f5;color:#636}
td.diverged{background:#fff0d8;color:#960} td.failed{background:#fde2e2} td.running{color:#06c}
ul.notes{font-size:.8em;color:#555;margin:.3em 0 1.2em;max-width:60em} figure{display:inline-block;margin:.5em;max-width:100%}
figure img{max-width:100%;border:1px solid #ddd} figcaption{font-size:.85em}
code{background:#f4f4f4;padding:0 .2em}
"""


def write_trials_csv(sweep: Sweep, path: Path) -> Path:
    cols = ["trial_key", "dataset", "variant", "fold", "status", "best_test_acc", "final_test_acc",
            "test_acc_at_best_val", "epochs", "best_epoch", "tokens_per_clip", "run_id"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for t in sorted(sweep.trials, key=lambda t: (t.dataset, t.variant, S.fold_sort_key(t.fold))):
            w.writerow([t.key, t.dataset, t.variant, t.fold, t.status or "", _num(t.best), _num(t.final), _num(t.at_best_val),
                        int_text(t.epochs), int_text(t.metrics.get(S.BEST_EPOCH)), int_text(t.tokens), t.run_id])
    return path


def _num(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def ui_url(sweep: Sweep) -> str | None:
    if sweep.tracking_uri.startswith(("http://", "https://")):
        # workflowType opens MLflow 3's model-training runs table instead of its GenAI overview
        return f"{sweep.tracking_uri.rstrip('/')}/#/experiments/{sweep.experiment_id}/runs?workflowType=machine_learning"
    return None


def write_report(sweep: Sweep, out: Path) -> Path:
    """Write tables, figures, trials.csv and index.html into out/<experiment>/; returns index.html."""
    root = Path(out) / slug(sweep.experiment)
    (root / "tables").mkdir(parents=True, exist_ok=True)
    tables = study_tables(sweep)
    for t in tables:
        (root / "tables" / f"{t.name}.md").write_text(t.to_markdown())
        (root / "tables" / f"{t.name}.html").write_text(html_page(t.title, f"<style>{CSS}</style>" + t.to_html()))
    (root / "tables.md").write_text(f"# {sweep.experiment}: tables\n\n" + "\n".join(t.to_markdown() for t in tables))
    figures = study_figures(sweep, root / "figures")
    write_trials_csv(sweep, root / "trials.csv")

    counts = Counter(t.status or "unknown" for t in sweep.trials)
    ui = ui_url(sweep)
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
    index.write_text(html_page(f"{sweep.experiment}: HELIX sweep report", "\n".join(parts)))
    log.info("Wrote %s (%d tables, %d figures)", index, len(tables), len(figures))
    return index


def html_page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"</head><body>\n{body}\n</body></html>\n")

