"""Selective-scan benchmark: the project's scan against a sequential loop and mambapy's pscan.

Times forward+backward of one scan, one Mamba mixer and one BiMamba block at the study's sizes
(d_model 256, so d_inner 512, d_state 32) at B=8, L=500 and B=1, L=30,000, and at the smoke grid's
(d_model 32, so d_inner 64, d_state 8) at B=32, L=50 and 100, where per-step and per-chunk
overheads rather than arithmetic set the time. All implementations are timed in this
one process, interleaved, so that the ratios hold on a shared machine; each figure is the best
of --repeats runs. Peak memory is measured separately: each (case, target, implementation) runs
once in a fresh subprocess, which reports its peak RSS (VmHWM in /proc/self/status) and its RSS just
before the forward pass (inputs and model built), so "+RSS" is what the forward+backward added.

Baselines that would take over --max-seconds or --max-gib at L=30,000 are skipped with the
reason; both figures are extrapolated linearly in B x padded L from the B=8, L=500 measurement.

    .venv/bin/python benchmarks/scan.py                 # everything except the full model
    .venv/bin/python benchmarks/scan.py --full-model    # also HELIX-raw (MMMAMM) at 30,000 tokens
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from helix_sweep.models import scan_pure
from helix_sweep.models.scan import selective_scan_pure

# case -> (batch, length, d_model, d_state); d_inner = 2 * d_model
CASES = {"smoke-B32xL50": (32, 50, 32, 8), "smoke-B32xL100": (32, 100, 32, 8),
         "B8xL500": (8, 500, 256, 32), "B1xL30000": (1, 30_000, 256, 32)}
TARGETS = ("scan", "mixer", "block")
# pure: selective_scan_pure's own choice ("whole" on CPU for short sequences, else "loop");
# pure-whole / pure-loop / pure-parallel: the modes forced where pure picks its numba-compiled "fused"
# mode (short sequences on CPU): "whole" is the same in PyTorch ops only, "loop" the chunked one.
IMPLS = ("pure", "pure-whole", "pure-loop", "pure-parallel", "sequential", "mambapy")
FULL_MODEL_SAMPLES = 480_000  # 30,000 tokens of the raw frontend (stride 160)


# --- baselines, same signature as selective_scan -------------------------------------------

def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Shared preamble of both baselines: fp32 (B, L, E) inputs and the processed delta."""
    u = u.float().transpose(1, 2)  # (B, L, E)
    delta = delta.float().transpose(1, 2)  # (B, L, E)
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    B = B.float().transpose(1, 2)  # (B, L, N)
    C = C.float().transpose(1, 2)  # (B, L, N)
    return u, delta, A.float(), B, C


def _finish(y, u, D, z, dtype):
    """y (B, L, E) -> out (B, E, L) with the D skip and the z gate."""
    if D is not None:
        y = y + u * D
    y = y.transpose(1, 2)  # (B, E, L)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence as a Python loop over time under plain autograd (the 'unbind' pattern)."""
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, E, N)
    inp = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (B, L, E, N)
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])  # (B, E, N)
    ys = []
    for a_t, b_t, c_t in zip(decay.unbind(1), inp.unbind(1), C.unbind(1)):
        h = a_t * h + b_t
        ys.append(torch.einsum("ben,bn->be", h, c_t))
    return _finish(torch.stack(ys, dim=1), u, D, z, dtype)  # (B, E, L)


def mambapy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mambapy's selective scan around its Blelloch `pscan` (pads L to a power of two)."""
    from mambapy.pscan import pscan

    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, E, N)
    inp = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (B, L, E, N)
    hs = pscan(decay, inp)  # (B, L, E, N)
    y = (hs @ C.unsqueeze(-1)).squeeze(3)  # (B, L, E)
    return _finish(y, u, D, z, dtype)


def pure_parallel_scan(*args, **kwargs):
    return selective_scan_pure(*args, mode="parallel", **kwargs)


def pure_loop_scan(*args, **kwargs):
    return selective_scan_pure(*args, mode="loop", **kwargs)


def pure_whole_scan(*args, **kwargs):
    return selective_scan_pure(*args, mode="whole", **kwargs)


def scan_fn(impl):
    return {"pure": selective_scan_pure, "pure-whole": pure_whole_scan, "pure-loop": pure_loop_scan,
            "pure-parallel": pure_parallel_scan,
            "sequential": sequential_scan, "mambapy": mambapy_scan}[impl]


def pure_picks_whole(batch, length, d_model, d_state):
    """Whether selective_scan_pure takes its short-sequence mode on CPU ("fused", or "whole" without
    numba) for this case's scans."""
    return batch * 2 * d_model * length * d_state <= scan_pure.WHOLE_MAX_ELEMENTS


# --- workloads ------------------------------------------------------------------------------

def make_workload(target, impl, batch, length, d_model, d_state, seed=0):
    """Returns a closure running one forward+backward, with inputs and model already built."""
    torch.manual_seed(seed)
    fn = scan_fn(impl)
    if target == "scan":
        E, N = 2 * d_model, d_state
        leaves = dict(
            u=torch.randn(batch, E, length), delta=torch.randn(batch, E, length) * 0.5,
            A=-torch.arange(1, N + 1).float().repeat(E, 1), B=torch.randn(batch, N, length),
            C=torch.randn(batch, N, length), D=torch.ones(E), z=torch.randn(batch, E, length),
            delta_bias=torch.full((E,), -3.0))
        for t in leaves.values():
            t.requires_grad_(True)

        def run():
            fn(**leaves, delta_softplus=True).sum().backward()
        return run

    import helix_sweep.models.mamba as mamba_mod

    if target == "mixer":
        module = mamba_mod.Mamba(d_model=d_model, d_state=d_state)
    else:
        from helix_sweep.models.blocks import BiMambaBlock

        module = BiMambaBlock(d_model=d_model, d_state=d_state)
    x = torch.randn(batch, length, d_model, requires_grad=True)

    def run():
        # the mixer looks the scan up at call time; `impl` is the dispatcher's, not the baselines'
        mamba_mod.selective_scan = lambda *args, impl=None, **kwargs: fn(*args, **kwargs)
        module(x).sum().backward()
    return run


def full_model_workload():
    from helix_sweep.models import build_classifier

    model = build_classifier("MMMAMM", "raw", 10)
    wave = torch.randn(1, FULL_MODEL_SAMPLES)
    label = torch.tensor([3])

    def run():
        F.cross_entropy(model(wave), label).backward()
    return run


def rss_gib(field="VmRSS"):
    """This process's resident set (VmRSS) or its peak (VmHWM), in GiB. Not ru_maxrss: Linux
    carries that over from the parent across fork+exec, so a child would report the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def worker(spec):
    """Subprocess entry: build, run once, print JSON with seconds, RSS before and peak RSS."""
    torch.set_num_threads(spec["threads"])
    if spec["target"] == "full-model":
        run = full_model_workload()
    else:
        run = make_workload(spec["target"], spec["impl"], spec["batch"], spec["length"],
                            spec["d_model"], spec["d_state"])
    before = rss_gib()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = rss_gib("VmHWM")
    print(json.dumps({"seconds": seconds, "rss_before_gib": before, "peak_rss_gib": peak}))


def in_subprocess(spec, timeout):
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def time_in_process(runs, repeats):
    """runs: {impl: closure}. Interleaved repeats after one warm-up each; best time per impl."""
    best = {}
    for impl, run in runs.items():
        run()  # warm-up: allocator, thread pool, oneDNN kernels
    for _ in range(repeats):
        for impl, run in runs.items():
            t0 = time.perf_counter()
            run()
            best[impl] = min(best.get(impl, math.inf), time.perf_counter() - t0)
    return best


def padded(length, impl):
    return 2 ** math.ceil(math.log2(length)) if impl == "mambapy" else length


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--max-gib", type=float, default=12.0)
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    ap.add_argument("--full-model", action="store_true",
                    help="also fwd+bwd of build_classifier('MMMAMM', 'raw', 10) at 30,000 tokens")
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, CPU capability {torch.backends.cpu.get_cpu_capability()}; times: best "
          f"of {args.repeats} in-process ({4 * args.repeats} for smoke cases, 1 at L > 1000); "
          f"memory: fresh subprocess, VmHWM")

    targets = [t for t in args.targets.split(",") if t]
    cases = [c for c in args.cases.split(",") if c]
    small = {}  # (target, impl, d_model, d_state) -> (seconds, +GiB) per element of B x padded L
    for target in targets:
        try:
            make_workload(target, "pure", 1, 8, 32, 8)
        except ImportError as exc:
            print(f"\n[{target}] skipped: {exc}")
            continue
        for case in cases:
            batch, length, d_model, d_state = CASES[case]
            dims = (d_model, d_state)
            runs, skipped = {}, {}
            for impl in IMPLS:
                if impl in ("pure-whole", "pure-loop") and not pure_picks_whole(batch, length, d_model, d_state):
                    continue  # pure already runs the loop mode here
                if impl != "pure" and (target, impl, *dims) in small:
                    per_s, per_gib = small[(target, impl, *dims)]
                    scale = batch * padded(length, impl)
                    if per_s * scale > args.max_seconds or per_gib * scale > args.max_gib:
                        skipped[impl] = (f"estimated {per_s * scale:.0f} s, +{per_gib * scale:.1f} GiB "
                                         f"(limits {args.max_seconds:.0f} s, {args.max_gib:.0f} GiB)")
                        continue
                runs[impl] = make_workload(target, impl, batch, length, d_model, d_state)
            # short cases take milliseconds: more repeats for a stable best on a shared machine
            repeats = 1 if length > 1000 else args.repeats if batch * length > 1000 else 4 * args.repeats
            best = time_in_process(runs, repeats)
            short = "fused" if scan_pure.scan_numba_status()[0] else "whole"
            mode = short if pure_picks_whole(batch, length, d_model, d_state) else "loop"
            print(f"\n[{target}] {case} (d_model {d_model}, d_state {d_state}; pure runs mode {mode}): "
                  f"fwd+bwd seconds (ratio = baseline / pure)")
            mem = {}
            for impl in runs:
                if not args.no_memory:
                    mem[impl] = in_subprocess(
                        {"target": target, "impl": impl, "batch": batch, "length": length,
                         "d_model": d_model, "d_state": d_state, "threads": args.threads},
                        timeout=max(600, 5 * best[impl]))
                m = mem.get(impl, {})
                mtxt = (f"peak RSS {m['peak_rss_gib']:.2f} GiB (+{m['peak_rss_gib'] - m['rss_before_gib']:.2f})"
                        if "peak_rss_gib" in m else m.get("error", ""))
                print(f"  {impl:14s} {best[impl]:8.4f} s  x{best[impl] / best['pure']:6.2f}   {mtxt}")
                if length <= 1000 and "peak_rss_gib" in m:
                    scale = batch * padded(length, impl)
                    small[(target, impl, *dims)] = (best[impl] / scale,
                                             (m["peak_rss_gib"] - m["rss_before_gib"]) / scale)
            for impl, why in skipped.items():
                print(f"  {impl:14s} skipped: {why}")
            del runs

    if args.full_model:
        print(f"\n[full model] build_classifier('MMMAMM', 'raw', 10), B=1, {FULL_MODEL_SAMPLES} samples:")
        try:
            from helix_sweep.models import build_classifier  # noqa: F401
        except ImportError as exc:
            print(f"  skipped: {exc}")
        else:
            m = in_subprocess({"target": "full-model", "threads": args.threads}, timeout=3600)
            if "error" in m:
                print(f"  failed: {m['error']}")
            else:
                print(f"  fwd+bwd {m['seconds']:.1f} s, peak RSS {m['peak_rss_gib']:.2f} GiB "
                      f"(+{m['peak_rss_gib'] - m['rss_before_gib']:.2f} over the built model)")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
