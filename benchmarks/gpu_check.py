"""One GPU check, < 10 minutes, nothing to download: `python benchmarks/gpu_check.py [--budget-s 540]`.

1. The selective scan alone at 8 x 500, 4 x 3,000 and 1 x 30,000 (d_inner 512, d_state 32), fwd+bwd:
   pure / triton / cuda-when-present, time, peak memory above the inputs, and the max relative
   difference of the output and of every gradient to the pure scan.
2. Forward+backward time and peak memory of the six variants at 500, 3,000 and 30,000 tokens
   (raw frontend: 160 samples a token; mel variants at the same clip lengths), fp16 autocast, for
   each scan implementation that runs here (model.scan_impl = pure, triton, and cuda when mamba_ssm's
   kernels run; attention-only variants have no scan and run once).
3. Peak memory of one attention block, SDPA vs naive (L x L weights), fwd+bwd, as L grows.
Each case runs in order until the time budget is spent; later cases are reported as skipped.
Prints a Markdown report; with $OUT set, also writes it to $OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helix_sweep.models import build_classifier  # noqa: E402
from helix_sweep.models.blocks import AttentionBlock  # noqa: E402
from helix_sweep.models import scan as scan_mod  # noqa: E402
from helix_sweep.models.scan import resolve_scan_impl, scan_impl_status  # noqa: E402

VARIANTS = {"mamba-raw": ("MMMMMM", "raw"), "mamba-mel": ("MMMMMM", "mel"), "helix-raw": ("MMMAMM", "raw"),
            "helix-mel": ("MMMAMM", "mel"), "attention-raw": ("AAAAAA", "raw"),
            "attention-mel": ("AAAAAA", "mel")}
CASES = [(500, 8), (3000, 4), (30000, 1)]  # (raw tokens per clip, batch)


def timed(fn, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of fn() after one warm-up, and peak GiB allocated during the timed calls
    (above what was allocated before them when PEAK_ABOVE_BASE is set)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if PEAK_ABOVE_BASE else 0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


PEAK_ABOVE_BASE = False


def fwd_bwd(model, x):
    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)
    return step


def run_case(lines, label, fn, deadline, note=""):
    if time.monotonic() > deadline:
        lines.append(f"| {label} | skipped (time budget) | | |")
        return None
    try:
        sec, gib = timed(fn)
        lines.append(f"| {label} | {sec * 1000:.1f} ms | {gib:.2f} GiB | {note} |")
        return sec
    except torch.cuda.OutOfMemoryError:
        lines.append(f"| {label} | out of memory | > {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB | |")
    except Exception as exc:  # report and go on: one failing case must not hide the others
        lines.append(f"| {label} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | |")
    finally:
        torch.cuda.empty_cache()
    return None


def scan_inputs(batch, L, dev, E=512, N=32):
    g = torch.Generator(device=dev).manual_seed(0)
    return dict(
        u=torch.randn(batch, E, L, device=dev, generator=g).requires_grad_(),
        delta=(torch.rand(batch, E, L, device=dev, generator=g) * 0.1).requires_grad_(),
        A=-torch.rand(E, N, device=dev, generator=g).add(0.5).requires_grad_(),
        B=torch.randn(batch, N, L, device=dev, generator=g).requires_grad_(),
        C=torch.randn(batch, N, L, device=dev, generator=g).requires_grad_(),
        D=torch.ones(E, device=dev, requires_grad=True),
        z=torch.randn(batch, E, L, device=dev, generator=g).requires_grad_(),
        delta_bias=torch.full((E,), -2.0, device=dev, requires_grad=True),
    )


def scan_outputs(impl, x, dout):
    """The output and the gradients of every input of one fwd+bwd."""
    out = scan_mod.selective_scan(**x, delta_softplus=True, impl=impl)
    return [out.detach(), *torch.autograd.grad(out, list(x.values()), dout)]


def scan_section(lines, impls, dev, deadline):
    global PEAK_ABOVE_BASE
    lines += ["", "## 1. Selective scan alone (d_inner 512, d_state 32), fwd+bwd, fp32", "",
              "| impl @ batch x L | time | peak above inputs | max rel diff to pure (out; worst grad) |",
              "|---|---|---|---|"]
    for batch, L in ((8, 500), (4, 3000), (1, 30000)):
        x = scan_inputs(batch, L, dev)
        dout = torch.randn(batch, 512, L, device=dev)
        ref = scan_outputs("pure", x, dout)
        times = {}
        for impl in impls:
            note = ""
            if impl != "pure":
                try:
                    got = scan_outputs(impl, x, dout)
                    diffs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, ref)]
                    note = f"{diffs[0]:.1e}; {max(diffs[1:]):.1e}"
                    del got
                except Exception as exc:
                    note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"

            def step(impl=impl):
                scan_mod.selective_scan(**x, delta_softplus=True, impl=impl).backward(dout)
                for t in x.values():
                    t.grad = None
            PEAK_ABOVE_BASE = True
            times[impl] = run_case(lines, f"{impl} @ {batch} x {L}", step, deadline, note)
            PEAK_ABOVE_BASE = False
        for impl in impls:
            if impl != "pure" and times.get(impl) and times.get("pure"):
                lines.append(f"| pure / {impl} time @ {batch} x {L} | {times['pure'] / times[impl]:.1f}x | | |")
        if times.get("triton") and times.get("cuda"):
            lines.append(f"| triton / cuda time @ {batch} x {L} | {times['triton'] / times['cuda']:.2f}x | | |")
        del x, dout, ref
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=540.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run this on a GPU machine")
        return 1
    deadline = time.monotonic() + args.budget_s
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    lines = [f"# gpu_check ({time.strftime('%Y-%m-%d')})", "",
             f"device {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}; "
             f"triton {triton_version()}; scan_impl=auto runs {resolve_scan_impl('auto', dev)}", ""]
    status = scan_impl_status(dev)
    lines += [f"- {impl}: {'runs' if runs else 'unavailable'} ({why})" for impl, (runs, why) in status.items()]
    impls = [impl for impl in ("pure", "triton", "cuda") if status[impl][0]]
    scan_section(lines, impls, dev, deadline)  # first: the figures the scan work is judged by
    lines += ["", "## 2. Variants, forward+backward (fp16 autocast)", "",
              "| variant @ tokens x batch [scan_impl] | time | peak | |", "|---|---|---|---|"]
    torch.manual_seed(0)
    for tokens, batch in CASES:
        for name, (pattern, frontend) in VARIANTS.items():
            for impl in (impls[::-1] if "M" in pattern else ["pure"]):  # fastest first
                model = build_classifier(pattern, frontend, 50, scan_impl=impl).to(dev)
                x = torch.randn(batch, tokens * 160, device=dev)
                label = f"{name} @ {model.num_tokens(x.shape[1])} x {batch}" + (f" [{impl}]" if "M" in pattern else "")
                run_case(lines, label, fwd_bwd(model, x), deadline)
                del model, x
    lines += ["", "## 3. One attention block, fwd+bwd, batch 1, fp16: SDPA vs naive", "",
              "| impl @ L | time | peak | |", "|---|---|---|---|"]
    for L in (3000, 10000, 30000):
        for impl in ("sdpa", "naive"):
            block = AttentionBlock(256, 1544, 4, impl).to(dev)
            x = torch.randn(1, L, 256, device=dev, requires_grad=True)
            run_case(lines, f"{impl} @ {L}", fwd_bwd(block, x), deadline)
            del block, x
    report = "\n".join(lines)
    print(report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(report + "\n")
    return 0


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
