"""python -m helix_sweep.report [experiment=NAME] [tracking_uri=URI] [workdir=DIR] [out=dashboards]"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from helix_sweep.report.page import ui_url, write_report
from helix_sweep.sweep.experiment import EXPERIMENTS
from helix_sweep.sweep.tracking import check_tracking_reachable, default_workdir, ensure_tracking_server

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


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from helix_sweep.report.loading import load_from  # MLflow: imported once the arguments are good

    workdir = Path(args.get("workdir") or default_workdir())
    uri = args.get("tracking_uri") or ensure_tracking_server(workdir)
    check_tracking_reachable(uri)
    # final statuses that trials of this work directory left undelivered (the server was away) go first
    sweep = load_from(uri, args.get("experiment"), pending_root=workdir / EXPERIMENTS)
    index = write_report(sweep, Path(args.get("out", "dashboards")))
    print(f"report: {index}")
    if ui_url(sweep):
        print(f"MLflow UI: {ui_url(sweep)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
