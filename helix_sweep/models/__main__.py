"""`python -m helix_sweep.models [clip_seconds=5] [num_classes=50] [d_model=256] [d_state=32]`:
the parameter table of the six variants (from search_spaces/variants.yaml), and the selective scan
implementation `model.scan_impl=auto` runs on this machine, with each one's availability."""

from __future__ import annotations

import sys

from helix_sweep.config import variant_catalog
import torch

from helix_sweep.models import build_classifier, resolve_scan_impl, scan_impl_status


def main(argv: list[str]) -> int:
    opts = {"clip_seconds": 5.0, "num_classes": 50, "d_model": 256, "d_state": 32}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts:
            print(f"unknown option {key!r}; valid: {', '.join(opts)}", file=sys.stderr)
            return 2
        opts[key] = type(opts[key])(value)
    samples = int(opts["clip_seconds"] * 16000)
    print(f"{'variant':<15}{'pattern':<9}{'total':>11}{'frontend':>10}{'head':>8}  {'per layer':<54}{'d_ffn':>6}"
          f"{'tokens':>8}")
    for name, v in variant_catalog().items():
        m = build_classifier(v.pattern, v.frontend, int(opts["num_classes"]), d_model=int(opts["d_model"]),
                             d_state=int(opts["d_state"]))
        r = m.param_report()
        print(f"{name:<15}{v.pattern:<9}{r['total']:>11,}{r['frontend']:>10,}{r['head']:>8,}  "
              f"{','.join(f'{n:,}' for n in r['layers']):<54}{r['d_ffn']:>6}{m.num_tokens(samples):>8}")
    print(f"\ntokens for a {opts['clip_seconds']:g} s clip at 16 kHz. The paper states ~8.3M parameters; "
          "its layer spec gives the totals above.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\nselective scan: scan_impl=auto runs {resolve_scan_impl('auto', device)} on {device}")
    for impl, (runs, why) in scan_impl_status(device).items():
        print(f"  {impl}: {'available' if runs else 'unavailable'} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
