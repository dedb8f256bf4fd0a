"""Selective scan in Triton: the contract of `helix_sweep.models.scan.selective_scan`, on any CUDA GPU.

Sequential in L, like mamba_ssm's CUDA kernel: one program per (batch, block of BLOCK_E channels)
holds the block's (BLOCK_E, N) state in registers and steps through the sequence; all arithmetic is
fp32 whatever the input dtype. Why sequential rather than a chunked `tl.associative_scan`: each step
is a few dozen flops per state element, the loads of step t+1 do not depend on step t, and the scan
needs only one pass over the (B, E, L) inputs; a chunked parallel scan needs two passes and a
(B, E, N, L/T) carry tensor to gain parallelism over L, which only pays off when B * E / BLOCK_E is
too small to fill the GPU (see `_block_e`: small blocks at B = 1 instead).

Memory is O(B x E x L), never (B, L, E, N):
  - forward: writes `out` and, when a gradient is needed, the state at every chunk boundary
    (B, L/T, E, N), T = CHUNK steps;
  - backward: walks the chunks in reverse; for each it recomputes the chunk's T states from the
    boundary state into a per-program scratch (T, BLOCK_E, N), then runs the reverse recurrence.
    dB/dC come out as per-channel-block partial sums (E/BLOCK_E, B, N, L) and dA/dD/ddelta_bias
    as per-batch partials (B, E, N), reduced in torch afterwards: deterministic, no atomics.

Grouped B/C (B, G, N, L) are supported: a channel block never straddles a group (BLOCK_E divides
E / G), so each program reads one group's B_t/C_t.

The kernels only run on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 in the environment before this module is imported; the tests do this).

Legend: B batch, E d_inner, N d_state (NP padded to a power of two), L sequence length,
G groups of B/C, H = E / G, T chunk.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _softplus(x):
    # log1p(exp(x)) with Kahan's log1p trick (tl has no portable log1p); torch's threshold of 20.
    y = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + y
    log1p = tl.where(w == 1.0, y, tl.log(w) * y / (w - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, states_ptr,
    E, N, L, G, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, BLOCK_E: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # (BLOCK_E,) channels
    n = tl.arange(0, NP)  # (NP,) states
    e_ok, n_ok = e < E, n < N
    en_ok = e_ok[:, None] & n_ok[None, :]  # (BLOCK_E, NP)
    g = (tl.program_id(1) * BLOCK_E) // (E // G)  # the block's group of B/C
    A = tl.load(A_ptr + e[:, None] * N + n[None, :], mask=en_ok, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    row = (b * E + e) * L  # (BLOCK_E,) start of each channel's sequence in (B, E, L)
    bc = (b * G + g) * N * L + n * L  # (NP,) start of each state's sequence in (B, G, N, L)

    h = tl.zeros((BLOCK_E, NP), dtype=tl.float32)
    c = 0
    while c < n_chunks:  # a runtime-bounded `range` fails under the interpreter; `while` works
        if SAVE_STATES:  # the state before chunk c, for the backward
            s_off = ((b * n_chunks + c) * E + e[:, None]) * N + n[None, :]
            tl.store(states_ptr + s_off, h, mask=en_ok)
        for k in range(CHUNK):
            t = c * CHUNK + k
            t_ok = t < L
            m = e_ok & t_ok
            u = tl.load(u_ptr + row + t, mask=m, other=0.0).to(tl.float32)  # (BLOCK_E,)
            dt = tl.load(delta_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            Bt = tl.load(B_ptr + bc + t, mask=n_ok & t_ok, other=0.0).to(tl.float32)  # (NP,)
            Ct = tl.load(C_ptr + bc + t, mask=n_ok & t_ok, other=0.0).to(tl.float32)  # (NP,)
            h_new = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]  # (BLOCK_E, NP)
            h = tl.where(t_ok, h_new, h)  # steps past L leave the state alone
            y = tl.sum(h * Ct[None, :], axis=1)  # (BLOCK_E,)
            if HAS_D:
                y += D * u
            if HAS_Z:
                z = tl.load(z_ptr + row + t, mask=m, other=0.0).to(tl.float32)
                y *= z * tl.sigmoid(z)
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=m)
        c += 1
    tl.store(last_ptr + (b * E + e[:, None]) * N + n[None, :], h, mask=en_ok)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr,
    scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    E, N, L, G, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_E: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    n_blocks = tl.num_programs(1)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)  # (BLOCK_E,)
    n = tl.arange(0, NP)  # (NP,)
    e_ok, n_ok = e < E, n < N
    en_ok = e_ok[:, None] & n_ok[None, :]
    g = (blk * BLOCK_E) // (E // G)
    A = tl.load(A_ptr + e[:, None] * N + n[None, :], mask=en_ok, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    row = (b * E + e) * L  # (BLOCK_E,)
    bc = (b * G + g) * N * L + n * L  # (NP,)
    part = (blk * tl.num_programs(0) + b) * N * L + n * L  # (NP,) row of this block's dB/dC partial
    # This program's scratch: the T states before each step of the current chunk, (T, BLOCK_E, NP).
    scratch = scratch_ptr + (b * n_blocks + blk) * CHUNK * BLOCK_E * NP \
        + tl.arange(0, BLOCK_E)[:, None] * NP + n[None, :]

    carry = tl.zeros((BLOCK_E, NP), dtype=tl.float32)  # dLoss/dh_t flowing back from step t+1
    dA_acc = tl.zeros((BLOCK_E, NP), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    c = n_chunks - 1
    while c >= 0:
        # Recompute the chunk's states from its boundary state.
        h = tl.load(states_ptr + ((b * n_chunks + c) * E + e[:, None]) * N + n[None, :],
                    mask=en_ok, other=0.0)
        for k in range(CHUNK):
            t = c * CHUNK + k
            t_ok = t < L
            m = e_ok & t_ok
            tl.store(scratch + k * BLOCK_E * NP, h)
            u = tl.load(u_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            Bt = tl.load(B_ptr + bc + t, mask=n_ok & t_ok, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        tl.debug_barrier()  # the scratch written above is read below, by other threads too
        # Reverse recurrence over the chunk. Steps past L have dout = 0, so g stays 0 there.
        for kk in range(CHUNK):
            k = CHUNK - 1 - kk
            t = c * CHUNK + k
            t_ok = t < L
            m = e_ok & t_ok
            h_prev = tl.load(scratch + k * BLOCK_E * NP)  # (BLOCK_E, NP), h_{t-1}
            u = tl.load(u_ptr + row + t, mask=m, other=0.0).to(tl.float32)  # (BLOCK_E,)
            x = tl.load(delta_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += bias
            if SOFTPLUS:
                dt = _softplus(x)
            else:
                dt = x
            dout = tl.load(dout_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + bc + t, mask=n_ok & t_ok, other=0.0).to(tl.float32)  # (NP,)
            Ct = tl.load(C_ptr + bc + t, mask=n_ok & t_ok, other=0.0).to(tl.float32)  # (NP,)
            a = tl.exp(dt[:, None] * A)  # (BLOCK_E, NP)
            h = a * h_prev + (dt * u)[:, None] * Bt[None, :]  # (BLOCK_E, NP), h_t
            if HAS_Z:  # out = y * silu(z)
                z = tl.load(z_ptr + row + t, mask=m, other=0.0).to(tl.float32)
                sz = tl.sigmoid(z)
                y = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    y += D * u
                tl.store(dz_ptr + row + t, (dout * y * sz * (1.0 + z * (1.0 - sz))).to(
                    dz_ptr.dtype.element_ty), mask=m)
                dy = dout * z * sz
            else:
                dy = dout
            g_t = carry + dy[:, None] * Ct[None, :]  # (BLOCK_E, NP), dLoss/dh_t
            tl.store(dC_ptr + part + t, tl.sum(dy[:, None] * h, axis=0), mask=n_ok & t_ok)
            tl.store(dB_ptr + part + t, tl.sum(g_t * (dt * u)[:, None], axis=0), mask=n_ok & t_ok)
            q = tl.sum(g_t * Bt[None, :], axis=1)  # (BLOCK_E,)
            du = q * dt
            if HAS_D:
                du += dy * D
                dD_acc += dy * u
            tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=m)
            p = g_t * a * h_prev  # (BLOCK_E, NP), through the decay exp(dt * A)
            ddt = q * u + tl.sum(p * A, axis=1)  # (BLOCK_E,)
            dA_acc += p * dt[:, None]
            if SOFTPLUS:
                ddt *= tl.sigmoid(x)
            dbias_acc += tl.where(t_ok, ddt, 0.0)
            tl.store(ddelta_ptr + row + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
            carry = a * g_t
        tl.debug_barrier()  # the next chunk overwrites the scratch
        c -= 1
    tl.store(dA_ptr + (b * E + e[:, None]) * N + n[None, :], dA_acc, mask=en_ok)
    tl.store(dD_ptr + b * E + e, dD_acc, mask=e_ok)
    tl.store(dbias_ptr + b * E + e, dbias_acc, mask=e_ok)


def _grouped(x):
    """(B, N, L) -> (B, 1, N, L); grouped (B, G, N, L) as is."""
    return x if x.dim() == 4 else x.unsqueeze(1)


def _block_e(batch, dim, groups, d_state):
    """Channels per program: a power of two dividing E / G (a block stays in one group), smaller
    when the batch is small so that B * E / BLOCK_E programs still fill a GPU, and smaller for
    large N so the (BLOCK_E, NP) state stays in registers."""
    per_group = dim // groups
    cap = 32 if batch >= 4 else 8
    cap = max(1, min(cap, 1024 // triton.next_power_of_2(d_state)))
    if groups == 1:
        return min(cap, triton.next_power_of_2(dim))
    block = 1
    while block * 2 <= cap and per_group % (block * 2) == 0:
        block *= 2
    return block


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, block_e):
        batch, dim, length = u.shape
        d_state = A.shape[1]
        # .contiguous() returns the input itself when it already is: nothing is copied or saved twice.
        u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
        z = z.contiguous() if z is not None else None
        B4, C4 = _grouped(B), _grouped(C)  # (B, G, N, L) views
        groups = B4.shape[1]
        A32 = A.float().contiguous()
        chunk = chunk_size or min(64, triton.next_power_of_2(length))
        block = block_e or _block_e(batch, dim, groups, d_state)
        if groups > 1 and (dim // groups) % block:  # a block must not straddle two groups
            raise ValueError(f"selective_scan_triton: block_e={block} must divide d_inner/groups="
                             f"{dim // groups} for grouped B/C")
        n_chunks = triton.cdiv(length, chunk)
        needs_grad = any(ctx.needs_input_grad[:8])

        out = torch.empty_like(u)  # (B, E, L), u's dtype
        last = torch.empty(batch, dim, d_state, device=u.device, dtype=torch.float32)  # (B, E, N)
        states = (torch.empty(batch, n_chunks, dim, d_state, device=u.device, dtype=torch.float32)
                  if needs_grad else last)  # (B, L/T, E, N)
        grid = (batch, triton.cdiv(dim, block))
        _scan_fwd_kernel[grid](
            u, delta, A32, B4, C4, D, z, delta_bias, out, last, states,
            dim, d_state, length, groups, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), SAVE_STATES=needs_grad, BLOCK_E=block,
            NP=triton.next_power_of_2(d_state), CHUNK=chunk,
        )
        last_state = last.to(A.dtype)
        ctx.mark_non_differentiable(last_state)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus, ctx.chunk, ctx.block = bool(delta_softplus), chunk, block
        return out, last_state

    @staticmethod
    def backward(ctx, dout, _dlast_state):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        A32, B4, C4 = A.float().contiguous(), _grouped(B), _grouped(C)  # (E, N), (B, G, N, L) x 2
        chunk, block = ctx.chunk, ctx.block
        batch, dim, length = u.shape
        groups, d_state = B4.shape[1], B4.shape[2]
        NP = triton.next_power_of_2(d_state)
        n_chunks = states.shape[1]
        n_blocks = triton.cdiv(dim, block)
        dout = dout.contiguous()
        f32 = dict(device=u.device, dtype=torch.float32)

        du, ddelta = torch.empty_like(u), torch.empty_like(delta)  # (B, E, L) each
        dz = torch.empty_like(z) if z is not None else None
        dB_part = torch.empty(n_blocks, batch, d_state, length, **f32)  # per channel block
        dC_part = torch.empty(n_blocks, batch, d_state, length, **f32)
        dA_part = torch.empty(batch, dim, d_state, **f32)  # per batch element
        dD_part = torch.empty(batch, dim, **f32)
        dbias_part = torch.empty(batch, dim, **f32)
        scratch = torch.empty(batch * n_blocks * chunk * block * NP, **f32)
        _scan_bwd_kernel[(batch, n_blocks)](
            u, delta, A32, B4, C4, D, z, delta_bias, dout, states,
            scratch, du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part,
            dim, d_state, length, groups, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, BLOCK_E=block, NP=NP, CHUNK=chunk,
        )

        def by_group(part):  # (E/BLOCK_E, B, N, L) partials -> (B, G, N, L)
            return part.view(groups, n_blocks // groups, batch, d_state, length).sum(1).transpose(0, 1)

        dB, dC = by_group(dB_part), by_group(dC_part)
        dB = (dB if B.dim() == 4 else dB.squeeze(1)).to(B.dtype)
        dC = (dC if C.dim() == 4 else dC.squeeze(1)).to(C.dtype)
        dA = dA_part.sum(0).to(A.dtype)  # (E, N)
        dD = dD_part.sum(0).to(D.dtype) if D is not None else None
        dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, *, chunk_size=None, block_e=None):
    """The selective scan as Triton kernels: same contract as `helix_sweep.models.scan.selective_scan`.

    chunk_size: steps T between saved states (a power of two; None: min(64, L rounded up)).
    block_e: channels per program (a power of two dividing E / G; None: chosen by shape).
    """
    from helix_sweep.models.scan import _check_shapes

    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if not (u.is_cuda or INTERPRETING):
        raise ValueError(f"selective_scan_triton: tensors are on {u.device}; the Triton kernels need "
                         "CUDA tensors (or TRITON_INTERPRET=1 set before helix_sweep.models.scan_triton "
                         "is imported, to interpret them on CPU)")
    for name, v in (("chunk_size", chunk_size), ("block_e", block_e)):
        if v is not None and (v < 1 or v & (v - 1)):
            raise ValueError(f"selective_scan_triton: {name}={v}, expected a power of two")
    out, last_state = _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                 chunk_size, block_e)
    return (out, last_state) if return_last_state else out
