"""Selective scan in Triton: the contract of `helix_sweep.models.scan.selective_scan`, on any CUDA GPU.

Sequential in L inside a program, parallel over batch, channel blocks and splits of L:
  - one program per (batch b, block of BLOCK_E channels, split s of the sequence) holds the block's
    (BLOCK_E, N) state in registers (N padded to NP, a power of two) and steps through its split;
    all arithmetic is fp32 whatever the input dtype.
  - the recurrence is linear, so splits combine exactly: a split run from a zero state ends in
    `local_s`, and its decay product is exp(A * sum of its steps); a tiny sequential kernel over the
    splits turns these into each split's true start state (forward) or the gradient carry arriving
    from later splits (backward). With one split (CPU, or enough batch x channel blocks to fill the
    GPU) that pass is skipped.
Why this and not a chunked `tl.associative_scan`: each step costs a few dozen flops per state value
and the loads of step t+1 do not depend on step t, so a plain loop is cheap; the splits give the
parallelism over L that a batch of 1 x 30,000 tokens needs, at the price of one extra pass over the
split's inputs (forward) or over dt, C and dout (backward). GPU timings: benchmarks/RESULTS.md.

Memory is O(B x E x L), never (B, L, E, N):
  - forward: writes `out` and, when a gradient is needed, the state at every chunk boundary
    (B, L/T, E, N), T = CHUNK steps, plus (B, S, E) sums of steps per split;
  - backward: walks each split's chunks in reverse; for each it recomputes the chunk's T states from
    the boundary state into a per-program scratch (T, BLOCK_E, NP), then runs the reverse recurrence.
    The scratch of all programs is kept under one (B, E, L) tensor + 64 MB by capping the splits.
    dB/dC come out as per-channel-block partial sums (E/BLOCK_E, B, N, L) and dA/dD/ddelta_bias as
    per-(batch, split) partials, reduced in torch afterwards: deterministic, no atomics.

Grouped B/C (B, G, N, L) are supported: a channel block never straddles a group (BLOCK_E divides
E / G), so each program reads one group's B_t/C_t.

The kernels only run on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 in the environment before this module is imported; the tests do this).

Legend: B batch, E d_inner, N d_state (NP padded to a power of two), L sequence length,
G groups of B/C, H = E / G, T chunk, S splits. One concept (the kernels and their autograd Function),
hence one module of over 400 lines.
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
    out_ptr, last_ptr, states_ptr, split_h_ptr, split_dt_ptr,
    E, N, L, G, n_chunks, split_chunks,
    LOCAL: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr, BLOCK_E: tl.constexpr, NP: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program: batch b, channel block, split s (chunks [s*split_chunks, (s+1)*split_chunks)).

    LOCAL: run the split from a zero state; store its end state and sum of steps for the combine.
    Otherwise: start from the split's true start state (split_h, after the combine), write `out`,
    the state before every chunk (SAVE_STATES) and, in the last split, the final state.
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(2)
    n_splits = tl.num_programs(2)
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
    split_en = ((b * n_splits + s) * E + e[:, None]) * N + n[None, :]  # (BLOCK_E, NP) in (B, S, E, N)

    if LOCAL:
        h = tl.zeros((BLOCK_E, NP), dtype=tl.float32)
        dt_sum = tl.zeros((BLOCK_E,), dtype=tl.float32)
    else:
        h = tl.load(split_h_ptr + split_en, mask=en_ok, other=0.0)
    c = s * split_chunks
    c_end = tl.minimum(c + split_chunks, n_chunks)
    while c < c_end:  # a runtime-bounded `range` fails under the interpreter; `while` works
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
            h_new = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]  # (BLOCK_E, NP)
            h = tl.where(t_ok, h_new, h)  # steps past L leave the state alone
            if LOCAL:
                dt_sum += tl.where(t_ok, dt, 0.0)
            else:
                Ct = tl.load(C_ptr + bc + t, mask=n_ok & t_ok, other=0.0).to(tl.float32)  # (NP,)
                y = tl.sum(h * Ct[None, :], axis=1)  # (BLOCK_E,)
                if HAS_D:
                    y += D * u
                if HAS_Z:
                    z = tl.load(z_ptr + row + t, mask=m, other=0.0).to(tl.float32)
                    y *= z * tl.sigmoid(z)
                tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=m)
        c += 1
    if LOCAL:
        tl.store(split_h_ptr + split_en, h, mask=en_ok)
        tl.store(split_dt_ptr + (b * n_splits + s) * E + e, dt_sum, mask=e_ok)
    else:
        tl.store(last_ptr + (b * E + e[:, None]) * N + n[None, :], h, mask=en_ok & (s == n_splits - 1))


@triton.jit
def _split_combine_kernel(buf_ptr, split_dt_ptr, A_ptr, E, N, n_splits, REVERSE: tl.constexpr,
                          BLOCK_E: tl.constexpr, NP: tl.constexpr):
    """Sequential over the splits of one (batch, channel block), in place in buf (B, S, E, N).

    Forward: buf[s] holds split s's end state from a zero start; it becomes the split's true start
    state: h_s = exp(A * sum of steps in split s-1) * h_{s-1} + local_{s-1}.
    REVERSE (backward): buf[s] holds the gradient carry split s passes back from a zero carry; it
    becomes the carry arriving at split s's last step from all later splits, by the same recurrence
    run from the last split (the decay over a split is exp(A * its sum of steps) either way).
    """
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, NP)
    en_ok = (e < E)[:, None] & (n < N)[None, :]
    A = tl.load(A_ptr + e[:, None] * N + n[None, :], mask=en_ok, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_E, NP), dtype=tl.float32)
    i = 0
    while i < n_splits:
        if REVERSE:
            s = n_splits - 1 - i
        else:
            s = i
        off = ((b * n_splits + s) * E + e[:, None]) * N + n[None, :]
        local = tl.load(buf_ptr + off, mask=en_ok, other=0.0)
        dt_sum = tl.load(split_dt_ptr + (b * n_splits + s) * E + e, mask=e < E, other=0.0)
        tl.store(buf_ptr + off, h, mask=en_ok)
        h = tl.exp(dt_sum[:, None] * A) * h + local
        i += 1


@triton.jit
def _scan_bwd_local_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, split_g_ptr,
    E, N, L, G, n_chunks, split_chunks,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_E: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
):
    """The gradient carry a split passes back to the previous one, from a zero carry at its end:
    g_t = C_t * dy_t + a_{t+1} * g_{t+1} needs no states, only steps, C and dy."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, NP)
    e_ok, n_ok = e < E, n < N
    en_ok = e_ok[:, None] & n_ok[None, :]
    g = (tl.program_id(1) * BLOCK_E) // (E // G)
    A = tl.load(A_ptr + e[:, None] * N + n[None, :], mask=en_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    row = (b * E + e) * L
    bc = (b * G + g) * N * L + n * L
    carry = tl.zeros((BLOCK_E, NP), dtype=tl.float32)
    c = tl.minimum((s + 1) * split_chunks, n_chunks) - 1
    while c >= s * split_chunks:
        for kk in range(CHUNK):
            t = c * CHUNK + CHUNK - 1 - kk
            t_ok = t < L
            m = e_ok & t_ok
            dt = tl.load(delta_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            dy = tl.load(dout_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + row + t, mask=m, other=0.0).to(tl.float32)
                dy *= z * tl.sigmoid(z)
            Ct = tl.load(C_ptr + bc + t, mask=n_ok & t_ok, other=0.0).to(tl.float32)
            carry = tl.exp(dt[:, None] * A) * (carry + dy[:, None] * Ct[None, :])
        c -= 1
    tl.store(split_g_ptr + ((b * n_splits + s) * E + e[:, None]) * N + n[None, :], carry, mask=en_ok)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, split_g_ptr,
    scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    E, N, L, G, n_chunks, split_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_E: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program: batch b, channel block, split s, from the carry later splits pass back."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    s = tl.program_id(2)
    n_blocks = tl.num_programs(1)
    n_splits = tl.num_programs(2)
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
    prog = (b * n_blocks + blk) * n_splits + s
    split_en = ((b * n_splits + s) * E + e[:, None]) * N + n[None, :]
    # This program's scratch: the T states before each step of the current chunk, (T, BLOCK_E, NP).
    scratch = scratch_ptr + prog * CHUNK * BLOCK_E * NP + tl.arange(0, BLOCK_E)[:, None] * NP + n[None, :]

    carry = tl.load(split_g_ptr + split_en, mask=en_ok, other=0.0)  # dLoss/dh_t from step t+1 on
    dA_acc = tl.zeros((BLOCK_E, NP), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    c = tl.minimum((s + 1) * split_chunks, n_chunks) - 1
    while c >= s * split_chunks:
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
    tl.store(dA_ptr + split_en, dA_acc, mask=en_ok)  # per (batch, split) partials
    tl.store(dD_ptr + (b * n_splits + s) * E + e, dD_acc, mask=e_ok)
    tl.store(dbias_ptr + (b * n_splits + s) * E + e, dbias_acc, mask=e_ok)


def _grouped(x):
    """(B, N, L) -> (B, 1, N, L); grouped (B, G, N, L) as is."""
    return x if x.dim() == 4 else x.unsqueeze(1)


def _block_e(dim, groups, d_state):
    """Channels per program: (BLOCK_E, NP) = 256 state values, one warp's registers, and a power of
    two dividing E / G so that a block stays in one group."""
    cap = max(1, 256 // triton.next_power_of_2(d_state))
    if groups == 1:
        return min(cap, triton.next_power_of_2(dim))
    block = 1
    while block * 2 <= cap and (dim // groups) % (block * 2) == 0:
        block *= 2
    return block


def _splits(u, programs, n_chunks, chunk, block, NP):
    """Splits of the sequence run in parallel: enough programs for half the GPU's warp slots, but
    the backward's per-program scratch (programs x T x BLOCK_E x NP floats) kept under one
    (B, E, L) tensor plus 64 MB."""
    if not u.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(u.device).multi_processor_count
    wanted = triton.cdiv(sms * 32, programs)
    batch, dim, length = u.shape
    affordable = (batch * dim * length + (1 << 24)) // (programs * chunk * block * NP)
    return max(1, min(wanted, affordable, n_chunks))


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, block_e, splits):
        batch, dim, length = u.shape
        d_state = A.shape[1]
        # .contiguous() returns the input itself when it already is: nothing is copied or saved twice.
        u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
        z = z.contiguous() if z is not None else None
        B4, C4 = _grouped(B), _grouped(C)  # (B, G, N, L) views
        groups = B4.shape[1]
        A32 = A.float().contiguous()
        NP = triton.next_power_of_2(d_state)
        chunk = chunk_size or min(64, triton.next_power_of_2(length))
        block = block_e or _block_e(dim, groups, d_state)
        if groups > 1 and (dim // groups) % block:  # a block must not straddle two groups
            raise ValueError(f"selective_scan_triton: block_e={block} must divide d_inner/groups="
                             f"{dim // groups} for grouped B/C")
        n_chunks = triton.cdiv(length, chunk)
        n_blocks = triton.cdiv(dim, block)
        splits = min(splits or _splits(u, batch * n_blocks, n_chunks, chunk, block, NP), n_chunks)
        split_chunks = triton.cdiv(n_chunks, splits)
        splits = triton.cdiv(n_chunks, split_chunks)  # no empty split
        needs_grad = any(ctx.needs_input_grad[:8])
        f32 = dict(device=u.device, dtype=torch.float32)

        out = torch.empty_like(u)  # (B, E, L), u's dtype
        last = torch.empty(batch, dim, d_state, **f32)  # (B, E, N)
        states = torch.empty(batch, n_chunks, dim, d_state, **f32) if needs_grad else last  # (B, L/T, E, N)
        split_h = torch.zeros(batch, splits, dim, d_state, **f32)  # (B, S, E, N)
        split_dt = torch.zeros(batch, splits, dim, **f32)  # (B, S, E)
        grid = (batch, n_blocks, splits)
        meta = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                    SOFTPLUS=bool(delta_softplus), BLOCK_E=block, NP=NP, CHUNK=chunk,
                    num_warps=max(1, min(8, block * NP // 256)))
        args = (u, delta, A32, B4, C4, D, z, delta_bias, out, last, states, split_h, split_dt,
                dim, d_state, length, groups, n_chunks, split_chunks)
        if splits > 1:  # each split's end state from zero, then every split's true start state
            _scan_fwd_kernel[grid](*args, LOCAL=True, SAVE_STATES=False, **meta)
            _split_combine_kernel[(batch, n_blocks)](split_h, split_dt, A32, dim, d_state, splits,
                                                     REVERSE=False, BLOCK_E=block, NP=NP,
                                                     num_warps=meta["num_warps"])
        _scan_fwd_kernel[grid](*args, LOCAL=False, SAVE_STATES=needs_grad, **meta)
        last_state = last.to(A.dtype)
        ctx.mark_non_differentiable(last_state)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, split_dt)
            ctx.delta_softplus, ctx.meta, ctx.split_chunks = bool(delta_softplus), meta, split_chunks
        return out, last_state

    @staticmethod
    def backward(ctx, dout, _dlast_state):
        u, delta, A, B, C, D, z, delta_bias, states, split_dt = ctx.saved_tensors
        A32, B4, C4 = A.float().contiguous(), _grouped(B), _grouped(C)  # (E, N), (B, G, N, L) x 2
        meta, split_chunks = ctx.meta, ctx.split_chunks
        chunk, block, NP = meta["CHUNK"], meta["BLOCK_E"], meta["NP"]
        batch, dim, length = u.shape
        groups, d_state = B4.shape[1], B4.shape[2]
        n_chunks, splits = states.shape[1], split_dt.shape[1]
        n_blocks = triton.cdiv(dim, block)
        dout = dout.contiguous()
        f32 = dict(device=u.device, dtype=torch.float32)

        du, ddelta = torch.empty_like(u), torch.empty_like(delta)  # (B, E, L) each
        dz = torch.empty_like(z) if z is not None else None
        dB_part = torch.empty(n_blocks, batch, d_state, length, **f32)  # per channel block
        dC_part = torch.empty(n_blocks, batch, d_state, length, **f32)
        dA_part = torch.empty(batch, splits, dim, d_state, **f32)  # per batch element and split
        dD_part = torch.empty(batch, splits, dim, **f32)
        dbias_part = torch.empty(batch, splits, dim, **f32)
        split_g = torch.zeros(batch, splits, dim, d_state, **f32)  # (B, S, E, N)
        scratch = torch.empty(batch * n_blocks * splits * chunk * block * NP, **f32)
        grid = (batch, n_blocks, splits)
        if splits > 1:  # the carry each split passes back from zero, then the carry into each split
            _scan_bwd_local_kernel[grid](
                delta, A32, C4, z, delta_bias, dout, split_g, dim, d_state, length, groups, n_chunks,
                split_chunks, HAS_Z=meta["HAS_Z"], HAS_BIAS=meta["HAS_BIAS"], SOFTPLUS=meta["SOFTPLUS"],
                BLOCK_E=block, NP=NP, CHUNK=chunk, num_warps=meta["num_warps"])
            _split_combine_kernel[(batch, n_blocks)](split_g, split_dt, A32, dim, d_state, splits,
                                                     REVERSE=True, BLOCK_E=block, NP=NP,
                                                     num_warps=meta["num_warps"])
        _scan_bwd_kernel[grid](
            u, delta, A32, B4, C4, D, z, delta_bias, dout, states, split_g,
            scratch, du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part,
            dim, d_state, length, groups, n_chunks, split_chunks, **meta,
        )

        def by_group(part):  # (E/BLOCK_E, B, N, L) partials -> (B, G, N, L)
            return part.view(groups, n_blocks // groups, batch, d_state, length).sum(1).transpose(0, 1)

        dB, dC = by_group(dB_part), by_group(dC_part)
        dB = (dB if B.dim() == 4 else dB.squeeze(1)).to(B.dtype)
        dC = (dC if C.dim() == 4 else dC.squeeze(1)).to(C.dtype)
        dA = dA_part.sum((0, 1)).to(A.dtype)  # (E, N)
        dD = dD_part.sum((0, 1)).to(D.dtype) if D is not None else None
        dbias = dbias_part.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None, None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, *, chunk_size=None, block_e=None, splits=None):
    """The selective scan as Triton kernels: same contract as `helix_sweep.models.scan.selective_scan`.

    chunk_size: steps T between saved states (a power of two; None: min(64, L rounded up)).
    block_e: channels per program (a power of two dividing E / G; None: chosen by N).
    splits: parts of the sequence run in parallel (None: enough to fill the GPU, 1 on CPU).
    """
    from helix_sweep.models.scan_pure import _check_shapes

    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if not (u.is_cuda or INTERPRETING):
        raise ValueError(f"selective_scan_triton: tensors are on {u.device}; the Triton kernels need "
                         "CUDA tensors (or TRITON_INTERPRET=1 set before helix_sweep.models.scan_triton "
                         "is imported, to interpret them on CPU)")
    for name, v in (("chunk_size", chunk_size), ("block_e", block_e)):
        if v is not None and (v < 1 or v & (v - 1)):
            raise ValueError(f"selective_scan_triton: {name}={v}, expected a power of two")
    if splits is not None and splits < 1:
        raise ValueError(f"selective_scan_triton: splits={splits}, expected >= 1")
    out, last_state = _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                 chunk_size, block_e, splits)
    return (out, last_state) if return_last_state else out
