"""Selective scan (the S6 recurrence of Mamba): mamba_ssm's CUDA kernel, Triton, or pure PyTorch.

For every batch b, channel e and state n (A real, B and C input-dependent):

    delta_t = softplus(delta_t + delta_bias)          (bias and softplus optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = <h_t, C_t> + D * u_t,   out_t = y_t * silu(z_t)   (D and z optional)

`selective_scan` has mamba_ssm's `selective_scan_fn` signature, shapes and semantics and is the one
dispatch point: `resolve_scan_impl(scan_impl, device)` picks mamba_ssm's kernel ("cuda") when a tiny
probe call shows it really runs, else the Triton kernels (helix_sweep.models.scan_triton) on CUDA,
else `selective_scan_pure`, the project's own scan with the same signature (CPU, or explicitly).

Legend: B batch, E d_inner, N d_state, L sequence length, G groups of B/C.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from helix_sweep.models.scan_pure import scan_numba_status, selective_scan_pure

# Implementations of the scan, in the order `auto` tries them. `cuda`: mamba_ssm's fused kernels;
# `triton`: helix_sweep.models.scan_triton; `pure`: `selective_scan_pure` below.
SCAN_IMPLS = ("auto", "cuda", "triton", "pure")
MAMBA_INSTALL = ("MAMBA_KEEP_CUDA_BUILD=TRUE pip install --no-build-isolation 'mamba-ssm>=2.2' "
                 "'causal-conv1d>=1.4' (or pip install -e '.[cuda]' as the README says)")


class ScanImplUnavailable(ValueError):
    """An explicitly requested scan implementation cannot run on the trial's device."""


@contextlib.contextmanager
def _probing(device):
    """A probe's tiny forward + backward runs the same under no_grad, inference_mode or autocast."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        yield


@functools.cache
def mamba_scan_status(device: torch.device) -> tuple[bool, str]:
    """(runs, why): whether mamba_ssm's `selective_scan_fn` really runs on `device`.

    Probed once per process and device with a tiny forward and backward: an import that succeeds
    says nothing, since mamba-ssm builds after 2.3.2.post1 skip the Mamba-1 CUDA scan unless
    MAMBA_KEEP_CUDA_BUILD=TRUE was set at install time, and then raise only when called.
    """
    device = torch.device(device)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # ImportError, or a compiled extension failing to load
        return False, f"mamba_ssm does not import ({type(e).__name__}: {e}); install: {MAMBA_INSTALL}"
    try:
        with _probing(device):
            u, delta, z, B, C = (torch.rand(1, 2, 4, device=device, requires_grad=True) for _ in range(5))
            A = -torch.ones(2, 2, device=device, requires_grad=True)
            selective_scan_fn(u, delta, A, B, C, None, z, None, True).sum().backward()
    except Exception as e:
        where = "" if device.type == "cuda" else f" (its kernels need a CUDA device; this is {device})"
        return False, (f"mamba_ssm imports but its selective scan does not run{where}: "
                       f"{type(e).__name__}: {e}; rebuild: {MAMBA_INSTALL}")
    return True, "mamba_ssm's selective_scan_fn runs"


@functools.cache
def mamba_mixer_status(device: torch.device) -> tuple[bool, str]:
    """(runs, why): whether mamba_ssm's fused `mamba_inner_fn` (scan + causal-conv1d) runs on `device`.

    It needs causal-conv1d's CUDA extension besides the scan; without it the mixer does the conv1d
    in PyTorch and still uses mamba_ssm's scan.
    """
    device = torch.device(device)
    runs, why = mamba_scan_status(device)
    if not runs:
        return runs, why
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

        E, N, R, W = 2, 2, 1, 4  # d_inner, d_state, dt_rank, conv width
        with _probing(device):
            xz = torch.rand(1, 2 * E, 8, device=device, requires_grad=True)  # (B, 2E, L)
            out = mamba_inner_fn(
                xz, torch.rand(E, 1, W, device=device), torch.rand(E, device=device),
                torch.rand(R + 2 * N, E, device=device), torch.rand(E, R, device=device),
                torch.rand(E, E, device=device), None, -torch.ones(E, N, device=device), None, None,
                torch.ones(E, device=device), delta_bias=torch.rand(E, device=device),
                delta_softplus=True)  # (B, L, E)
            out.sum().backward()
    except Exception as e:
        return False, (f"mamba_ssm's fused mamba_inner_fn does not run ({type(e).__name__}: {e}); "
                       f"it needs causal-conv1d's CUDA extension: {MAMBA_INSTALL}")
    return True, "mamba_ssm's mamba_inner_fn runs (causal-conv1d present)"


@functools.cache
def triton_scan_status(device: torch.device) -> tuple[bool, str]:
    """(runs, why): whether the Triton scan runs on `device`, probed once with a tiny call.

    CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1), which is for tests: far too
    slow to train with, so `auto` never picks Triton off CUDA.
    """
    device = torch.device(device)
    try:
        from helix_sweep.models.scan_triton import selective_scan_triton
    except Exception as e:
        return False, (f"triton does not import ({type(e).__name__}: {e}); it ships with the CUDA "
                       "torch wheels: pip install torch==2.11.0 (Linux, CUDA build)")
    try:
        with _probing(device):
            u, delta, B, C = (torch.rand(1, 2, 3, device=device, requires_grad=True) for _ in range(4))
            A = -torch.ones(2, 2, device=device, requires_grad=True)
            selective_scan_triton(u, delta, A, B, C, delta_softplus=True).sum().backward()
    except Exception as e:
        return False, f"the Triton scan does not run on {device}: {type(e).__name__}: {e}"
    return True, "the Triton scan runs"


def scan_impl_status(device: torch.device) -> dict[str, tuple[bool, str]]:
    """{impl: (runs, why)} for the concrete implementations on `device`."""
    device = torch.device(device)
    triton_ok = (False, f"Triton kernels need a CUDA device; this is {device}")
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        triton_ok = triton_scan_status(device)
    fused, why = scan_numba_status()
    return {"cuda": mamba_scan_status(device), "triton": triton_ok,
            "pure": (True, "the project's own scan, runs everywhere; short sequences on CPU: "
                           + ("numba-compiled kernels" if fused else f"PyTorch ops only ({why})"))}


@functools.cache
def resolve_scan_impl(requested: str, device) -> str:
    """The implementation a scan on `device` runs: "cuda", "triton" or "pure".

    auto: mamba_ssm's kernels when they really run, else Triton on CUDA, else pure. An explicit
    request that cannot run raises ScanImplUnavailable naming what is missing and how to install it.
    """
    device = torch.device(device)
    if requested not in SCAN_IMPLS:
        raise ValueError(f"scan_impl={requested!r}: expected one of {', '.join(SCAN_IMPLS)}")
    if requested == "auto":
        if mamba_scan_status(device)[0]:
            return "cuda"
        if device.type == "cuda" and triton_scan_status(device)[0]:
            return "triton"
        return "pure"
    runs, why = scan_impl_status(device)[requested]
    if not runs:
        raise ScanImplUnavailable(f"scan_impl={requested} cannot run on {device}: {why}")
    return requested



def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, impl="auto"):
    """Selective scan with mamba_ssm's `selective_scan_fn` contract.

    u, delta: (B, E, L); A: (E, N) real; B, C: (B, N, L) or grouped (B, G, N, L); D: (E,);
    z: (B, E, L); delta_bias: (E,). Returns out (B, E, L) in u's dtype, and with
    return_last_state also the final state (B, E, N) (no gradient flows through it).
    impl: one of SCAN_IMPLS, resolved for u's device by `resolve_scan_impl` (the one dispatch point).
    """
    impl = resolve_scan_impl(impl, u.device)
    if impl == "cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if impl == "triton":
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     return_last_state)
    return selective_scan_pure(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, **kwargs):
    """The Triton scan (helix_sweep.models.scan_triton), imported on first use so that importing the
    models needs no triton, and so tests can set TRITON_INTERPRET before its kernels are decorated.
    Same contract as `selective_scan`; kwargs: chunk_size, block_e."""
    from helix_sweep.models.scan_triton import selective_scan_triton as scan

    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, **kwargs)
