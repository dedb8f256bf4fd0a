"""One GPU check, < 10 minutes, nothing to download: `python benchmarks/gpu_check.py [--budget-s 480]`.

1. Forward+backward time and peak memory of the six variants at 500, 3,000 and 30,000 tokens
   (raw frontend: 160 samples a token; mel variants at the same clip lengths), fp16 autocast.
2. Peak memory of one attention block, SDPA vs naive (L x L weights), fwd+bwd, as L grows.
3. The selective scan alone: the project's pure path (its GPU formulation) at the study's shapes,
   and, where mamba_ssm imports, its fused kernel on the same inputs (time ratio, max difference).
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

VARIANTS = {"mamba-raw": ("MMMMMM", "raw"), "mamba-mel": ("MMMMMM", "mel"), "helix-raw": ("MMMAMM", "raw"),
            "helix-mel": ("MMMAMM", "mel"), "attention-raw": ("AAAAAA", "raw"),
            "attention-mel": ("AAAAAA", "mel")}
CASES = [(500, 8), (3000, 4), (30000, 1)]  # (raw tokens per clip, batch)


def timed(fn, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of fn() after one warm-up, and peak GiB allocated during the timed calls."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def fwd_bwd(model, x):
    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)
    return step


def run_case(lines, label, fn, deadline):
    if time.monotonic() > deadline:
        lines.append(f"| {label} | skipped (time budget) | |")
        return None
    try:
        sec, gib = timed(fn)
        lines.append(f"| {label} | {sec * 1000:.1f} ms | {gib:.2f} GiB |")
        return sec
    except torch.cuda.OutOfMemoryError:
        lines.append(f"| {label} | out of memory | > {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB |")
    except Exception as exc:  # report and go on: one failing case must not hide the others
        lines.append(f"| {label} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | |")
    finally:
        torch.cuda.empty_cache()
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=480.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run this on a GPU machine")
        return 1
    deadline = time.monotonic() + args.budget_s
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    lines = [f"# gpu_check ({time.strftime('%Y-%m-%d')})", "",
             f"device {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}; "
             f"mamba_ssm kernels: {'yes' if scan_mod.HAS_MAMBA_KERNELS else 'no (pure PyTorch scan)'}", "",
             "## 1. Variants, forward+backward (fp16 autocast)", "", "| variant @ tokens x batch | time | peak |",
             "|---|---|---|"]
    torch.manual_seed(0)
    for tokens, batch in CASES:
        for name, (pattern, frontend) in VARIANTS.items():
            model = build_classifier(pattern, frontend, 50).to(dev)
            x = torch.randn(batch, tokens * 160, device=dev)
            run_case(lines, f"{name} @ {model.num_tokens(x.shape[1])} x {batch}", fwd_bwd(model, x), deadline)
            del model, x
    lines += ["", "## 2. One attention block, fwd+bwd, batch 1, fp16: SDPA vs naive", "",
              "| impl @ L | time | peak |", "|---|---|---|"]
    for L in (3000, 10000, 30000):
        for impl in ("sdpa", "naive"):
            block = AttentionBlock(256, 1544, 4, impl).to(dev)
            x = torch.randn(1, L, 256, device=dev, requires_grad=True)
            run_case(lines, f"{impl} @ {L}", fwd_bwd(block, x), deadline)
            del block, x
    lines += ["", "## 3. Selective scan alone (d_inner 512, d_state 32), fwd+bwd", "",
              "| path @ batch x L | time | peak |", "|---|---|---|"]
    for batch, L in ((8, 500), (4, 3000), (1, 30000)):
        E, N = 512, 32
        g = torch.Generator(device=dev).manual_seed(0)
        u = torch.randn(batch, E, L, device=dev, generator=g).requires_grad_()
        delta = (torch.rand(batch, E, L, device=dev, generator=g) * 0.1).requires_grad_()
        A = -torch.rand(E, N, device=dev, generator=g).add(0.5).requires_grad_()
        B = torch.randn(batch, N, L, device=dev, generator=g).requires_grad_()
        C = torch.randn(batch, N, L, device=dev, generator=g).requires_grad_()
        D = torch.ones(E, device=dev, requires_grad=True)
        z = torch.randn(batch, E, L, device=dev, generator=g).requires_grad_()

        def pure():
            scan_mod.selective_scan_pure(u, delta, A, B, C, D, z=z, delta_softplus=True).sum().backward()
        t_pure = run_case(lines, f"pure PyTorch @ {batch} x {L}", pure, deadline)
        if scan_mod.HAS_MAMBA_KERNELS:
            def fused():
                scan_mod.selective_scan(u, delta, A, B, C, D, z=z, delta_softplus=True).sum().backward()
            t_fused = run_case(lines, f"mamba_ssm kernel @ {batch} x {L}", fused, deadline)
            with torch.no_grad():
                a = scan_mod.selective_scan_pure(u, delta, A, B, C, D, z=z, delta_softplus=True)
                b = scan_mod.selective_scan(u, delta, A, B, C, D, z=z, delta_softplus=True)
            rel = ((a - b).abs().max() / b.abs().max()).item()
            if t_pure and t_fused:
                lines.append(f"| pure / kernel time ratio @ {batch} x {L} | {t_pure / t_fused:.1f}x | max rel diff {rel:.1e} |")
        del u, delta, A, B, C, D, z
        torch.cuda.empty_cache()
    report = "\n".join(lines)
    print(report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
