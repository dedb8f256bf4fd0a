"""The project's own selective scan in pure PyTorch: `selective_scan_pure`, with the contract of
mamba_ssm's `selective_scan_fn` (helix_sweep.models.scan dispatches to it on CPU, or when asked).

For every batch b, channel e and state n (A real, B and C input-dependent):

    delta_t = softplus(delta_t + delta_bias)          (bias and softplus optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = <h_t, C_t> + D * u_t,   out_t = y_t * silu(z_t)   (D and z optional)

Except for short sequences on CPU ("whole" below), the pure scan never holds the (B, L, E, N)
state tensor. It walks the sequence in chunks of T steps and materialises only a chunk's
(T, B, E, N) operands at a time; for the backward it keeps
one state every K steps (K ~ sqrt(L)), recomputes a segment of K states from it, and runs the
reverse recurrence chunk by chunk. Memory is O((L/K + K) * B * E * N) instead of O(L * B * E * N).
Inside a chunk the recurrence is solved one of two ways, chosen by the device:
  - "loop" (CPU): one in-place multiply-add per step on (B, E, N) slices that stay in cache;
  - "parallel" (CUDA and other accelerators): a doubling (Hillis-Steele) scan over the chunk,
    log2(T) vectorised steps, so kernel launches scale with L / T rather than L. It only multiplies
    decays in (0, 1], so it cannot overflow the way a log-space cumsum does.
Short sequences on CPU take a third mode, "whole" (chosen by size: B * L * E * N up to
WHOLE_MAX_ELEMENTS, e.g. the smoke grid's B=32, L=100, E=64, N=8): no chunks, all L states at once
in an H-innermost layout, kept for the backward (see `_whole_forward`). Where numba imports and
B/C have no groups the same sizes run "fused" instead: two numba-compiled kernels
(helix_sweep.models.mixer_numba) that take the inputs in the mixer's layouts and do the decays, the
recurrence, the skip and the gate (and in the backward every gradient) one batch element at a time,
keeping no states (the backward recomputes them); ~1.6x faster than the old fused loops at the smoke
grid's sizes, which spent most of their time in the transposing copies and the full-batch tensors.
All arithmetic is fp32 whatever the input dtype; outputs and gradients come back in the inputs'
dtypes.

One concept (the pure scan and its formulations), hence one module over 400 lines.

Legend: B batch, E d_inner, N d_state, L sequence length, G groups of B/C, H = E / G, T chunk.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

MODES = ("loop", "parallel", "whole", "fused")
# Chunk length T per mode, a power of two sized so one (T, B, E, N) fp32 buffer holds about
# *_CHUNK_ELEMENTS values: ~4 MB for the CPU loop (a chunk's few buffers stay in L2/L3 cache),
# ~32 MB on an accelerator (fewer, larger kernels). Measured on an H200 (benchmarks/scan_chunks.py,
# fwd+bwd at E=512, N=32): T = 64 / 128 / 512 at B x L = 8 x 500 / 4 x 3,000 / 1 x 30,000 ran
# 16 / 53 / 161 ms, 1.7-2.2x faster than the 16 MB budget's T = 32 / 64 / 256.
LOOP_CHUNK_ELEMENTS = 1 << 20
LOOP_CHUNK_RANGE = (4, 64)
PARALLEL_CHUNK_ELEMENTS = 1 << 23
PARALLEL_CHUNK_RANGE = (16, 1024)


def selective_scan_pure(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, *, mode=None, chunk_size=None):
    """The project's own selective scan: same contract as `selective_scan`, PyTorch ops (plus
    numba's compiled kernels in the "fused" mode).

    mode: "loop", "parallel", "whole" or "fused" (see the module docstring); None picks, on CPU,
    "fused" (or "whole" without numba, or with grouped B/C) while the (B, L, E, N) state has at
    most WHOLE_MAX_ELEMENTS values and "loop" above that, and "parallel" elsewhere. chunk_size:
    steps per chunk T (None: the mode's default; "whole" and "fused" have no chunks and ignore it).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if mode is None:
        if u.device.type != "cpu":
            mode = "parallel"
        else:
            size = u.shape[0] * u.shape[1] * u.shape[2] * A.shape[1]  # B * E * L * N
            mode = "loop" if size > WHOLE_MAX_ELEMENTS else "fused" if fused_runs(B, C) else "whole"
    if mode not in MODES:
        raise ValueError(f"selective_scan_pure: mode={mode!r}, expected one of {MODES}")
    if mode == "fused" and not (u.device.type == "cpu" and fused_runs(B, C)):
        raise ValueError(f"selective_scan_pure: mode='fused' needs CPU tensors, B and C without groups and numba "
                         f"({scan_numba_status()[1]})")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"selective_scan_pure: chunk_size={chunk_size}, expected >= 1")
    out, last_state = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                           mode, chunk_size)
    return (out, last_state) if return_last_state else out


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"selective_scan: A must be real (d_inner={dim}, d_state), got "
                         f"{tuple(A.shape)} {A.dtype}")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        ok = (t.dim() == 3 and t.shape == (batch, d_state, length)) or (
            t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == (d_state, length)
            and dim % t.shape[1] == 0)
        if not ok:
            raise ValueError(f"selective_scan: {name} must be (batch, d_state, L) = "
                             f"{(batch, d_state, length)} or (batch, groups, d_state, L) with groups "
                             f"dividing d_inner={dim}, got {tuple(t.shape)} (only input-dependent "
                             f"B/C are supported)")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"selective_scan: B has {B.shape[1]} groups but C has {C.shape[1]}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be (d_inner={dim},), got {tuple(t.shape)}")


@functools.cache
def scan_numba_status() -> tuple[bool, str]:
    """(runs, why): whether the "fused" mode's compiled kernels (helix_sweep.models.mixer_numba) import."""
    try:
        import helix_sweep.models.mixer_numba  # noqa: F401
    except Exception as e:  # numba missing, or built for another numpy
        return False, f"numba does not import ({type(e).__name__}: {e}); pip install numba"
    return True, "numba compiles the CPU scan's loops"


def scan_numba():
    import helix_sweep.models.mixer_numba as kernels

    return kernels


def fused_runs(B, C) -> bool:
    return B.dim() == 3 and C.dim() == 3 and scan_numba_status()[0]


def chunk_len(mode, chunk_size, batch, dim, d_state, length):
    """Chunk length T of the pure scan: chunk_size if given, else the largest power of two whose
    (T, B, E, N) fp32 buffer fits the mode's element budget, clamped to the mode's range and L
    (also the cost model's, helix_sweep.training.budget)."""
    if chunk_size is not None:
        return min(chunk_size, length)
    budget, (low, high) = ((LOOP_CHUNK_ELEMENTS, LOOP_CHUNK_RANGE) if mode == "loop"
                           else (PARALLEL_CHUNK_ELEMENTS, PARALLEL_CHUNK_RANGE))
    fit = max(1, budget // (batch * dim * d_state))
    return min(max(low, 1 << (fit.bit_length() - 1)), high, length)


def segment_len(chunk, length):
    """Steps between saved states: a multiple of the chunk near sqrt(L), which minimises
    saved states (L / K) plus the segment recomputed in backward (K)."""
    k = max(1, round(math.sqrt(length) / chunk)) * chunk
    return min(k, math.ceil(length / chunk) * chunk)


class _Chunks:
    """Time-major fp32 copies of one chunk of the (B, E, L) and (B, [G,] N, L) inputs.

    Copying per chunk instead of transposing whole inputs keeps the scan's own memory to its
    outputs and a few chunk buffers.
    """

    def __init__(self, delta, B, C, delta_bias, delta_softplus):
        self.delta = delta
        self.B = B if B.dim() == 4 else B.unsqueeze(1)  # (B, G, N, L)
        self.C = C if C.dim() == 4 else C.unsqueeze(1)  # (B, G, N, L)
        self.bias = delta_bias.float() if delta_bias is not None else None
        self.softplus = delta_softplus

    @staticmethod
    def take(x, c0, c1):
        """(B, E, L) -> (T, B, E), or (B, G, N, L) -> (T, B, G, N); a fresh fp32 tensor."""
        x = x[..., c0:c1]
        x = x.permute(2, 0, 1) if x.dim() == 3 else x.permute(3, 0, 1, 2)  # time first
        return torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)

    def dt(self, c0, c1):
        """The step size the recurrence uses, softplus(delta + delta_bias): (T, B, E)."""
        dt = self.take(self.delta, c0, c1)
        if self.bias is not None:
            dt += self.bias
        return F.softplus(dt) if self.softplus else dt


def _scan_loop(a, h):
    """In place: h[t] = a[t-1] * h[t-1] + h[t] for t = 1..T; h: (T+1, ...), h[0] the start state."""
    hs, as_ = h.unbind(0), a.unbind(0)  # one call for all views, not three per step
    for t in range(1, len(hs)):
        hs[t].addcmul_(as_[t - 1], hs[t - 1])


def _scan_parallel(a, h, tmp):
    """Same result as `_scan_loop` by doubling: after the step with offset k, h[t] sums the last
    2k inputs and a[t] holds their decay product. Consumes `a`; tmp: a buffer like `a`."""
    h[1].addcmul_(a[0], h[0])  # fold the start state into the first step
    x, w = h[1:], a
    steps = x.shape[0]
    k = 1
    while k < steps:
        # Through tmp, since x[k:] and x[:-k] overlap (an in-place addcmul would read rows
        # it has already written).
        x[k:] += torch.mul(w[k:], x[:-k], out=tmp[:steps - k])
        if 2 * k < steps:
            w[k:] = torch.mul(w[k:], w[:-k], out=tmp[:steps - k])
        k *= 2


def _scan_reverse_loop(a_next, g):
    """In place: g[t] += a_next[t] * g[t+1] for t = T-2..0."""
    gs, as_ = g.unbind(0), a_next.unbind(0)
    for t in range(len(gs) - 2, -1, -1):
        gs[t].addcmul_(as_[t], gs[t + 1])


def _scan_reverse_parallel(a_next, g, tmp):
    """Same result as `_scan_reverse_loop` by doubling; consumes `a_next`."""
    steps = g.shape[0]
    k = 1
    while k < steps:
        g[:-k] += torch.mul(a_next[:-k], g[k:], out=tmp[:steps - k])
        if 2 * k < steps:
            a_next[:-k] = torch.mul(a_next[:-k], a_next[k:], out=tmp[:steps - k])
        k *= 2


class _SelectiveScan(torch.autograd.Function):
    """Forward keeps one state every K steps; backward recomputes the rest segment by segment.

    Besides these states it saves only its inputs; the backward allocates the gradients, one
    segment of states and decays, and a few chunk buffers.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, mode, chunk_size):
        if mode == "fused":
            return _fused_forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        if mode == "whole":
            return _whole_forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        batch, dim, length = u.shape
        d_state = A.shape[1]
        groups = B.shape[1] if B.dim() == 4 else 1
        chunk = chunk_len(mode, chunk_size, batch, dim, d_state, length)
        segment = segment_len(chunk, length)
        needs_grad = any(ctx.needs_input_grad[:8])
        x = _Chunks(delta, B, C, delta_bias, delta_softplus)
        A32 = A.float()
        D32 = D.float() if D is not None else None

        state_shape = (batch, dim, d_state)
        states = A32.new_empty(chunk + 1, *state_shape)  # (T+1, B, E, N)
        decay = A32.new_empty(chunk, *state_shape)  # (T, B, E, N)
        work = A32.new_empty(2, chunk, *state_shape) if mode == "parallel" else None
        out = torch.empty_like(u, memory_format=torch.contiguous_format)  # (B, E, L)
        states[-1].zero_()
        # The state before every segment of K steps: all the backward keeps.
        saved = A32.new_empty(-(-length // segment), *state_shape) if needs_grad else None
        for c0 in range(0, length, chunk):
            c1 = min(c0 + chunk, length)
            n = c1 - c0
            hs = states[:n + 1]  # (T+1, B, E, N)
            hs[0] = states[-1]  # the previous chunk's last state
            if saved is not None and c0 % segment == 0:
                saved[c0 // segment] = hs[0]
            u_c, dt_c = x.take(u, c0, c1), x.dt(c0, c1)  # (T, B, E) each
            a = _decay(dt_c, A32, out=decay[:n])  # (T, B, E, N)
            _chunk_states(a, dt_c.mul_(u_c), x.take(x.B, c0, c1), hs, mode, work)
            y = _sum_state(hs[1:], x.take(x.C, c0, c1))  # (T, B, E)
            if D is not None:
                y.addcmul_(u_c, D32)
            if z is not None:
                y.mul_(F.silu(x.take(z, c0, c1), inplace=True))
            out[:, :, c0:c1] = y.permute(1, 2, 0)  # (B, E, T)
            if n < chunk:
                states[-1] = hs[-1]
        last_state = states[-1].to(A.dtype)  # (B, E, N)

        ctx.mark_non_differentiable(last_state)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, saved)
            ctx.delta_softplus = delta_softplus
            ctx.mode, ctx.chunk, ctx.segment, ctx.groups = mode, chunk, segment, groups
        return out, last_state

    @staticmethod
    def backward(ctx, dout, _dlast_state):
        if ctx.mode == "fused":
            return _fused_backward(ctx, dout)
        if ctx.mode == "whole":
            return _whole_backward(ctx, dout)
        u, delta, A, B, C, D, z, delta_bias, saved = ctx.saved_tensors
        mode, chunk, segment, groups = ctx.mode, ctx.chunk, ctx.segment, ctx.groups
        batch, dim, length = u.shape
        d_state = A.shape[1]
        hdim = dim // groups
        x = _Chunks(delta, B, C, delta_bias, ctx.delta_softplus)
        A32 = A.float()
        D32 = D.float() if D is not None else None

        grad_u = torch.empty_like(u, memory_format=torch.contiguous_format)  # (B, E, L)
        grad_delta = torch.empty_like(delta, memory_format=torch.contiguous_format)  # (B, E, L)
        grad_z = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else None
        grad_B = torch.empty_like(x.B, memory_format=torch.contiguous_format)  # (B, G, N, L)
        grad_C = torch.empty_like(x.C, memory_format=torch.contiguous_format)  # (B, G, N, L)
        dA = torch.zeros_like(A32)  # (E, N)
        dD = torch.zeros_like(D32) if D is not None else None  # (E,)
        dbias = torch.zeros(dim, device=u.device)  # (E,)

        state_shape = (batch, dim, d_state)
        seg_states = A32.new_empty(segment + 1, *state_shape)  # (K+1, B, E, N)
        seg_decay = A32.new_empty(segment, *state_shape)  # (K, B, E, N)
        seg_dt = A32.new_empty(segment, batch, dim)  # (K, B, E)
        seg_dtu = A32.new_empty(segment, batch, dim)  # (K, B, E), delta * u
        grad = A32.new_empty(chunk, *state_shape)  # (T, B, E, N)
        scratch = A32.new_empty(chunk, *state_shape)  # (T, B, E, N)
        work = A32.new_empty(2, chunk, *state_shape) if mode == "parallel" else None
        carry = A32.new_zeros(state_shape)  # dLoss/dh_t flowing back from step t+1
        n_segments = (length + segment - 1) // segment
        for s_idx in range(n_segments - 1, -1, -1):
            s0 = s_idx * segment
            s1 = min(s0 + segment, length)
            # Recompute the segment's step sizes, decays and states, chunk by chunk.
            seg_states[0] = saved[s_idx]
            for c0 in range(s0, s1, chunk):
                c1 = min(c0 + chunk, s1)
                k0, k1 = c0 - s0, c1 - s0
                dt_c = seg_dt[k0:k1]  # (T, B, E)
                dt_c.copy_(x.dt(c0, c1))
                a = _decay(dt_c, A32, out=seg_decay[k0:k1])  # (T, B, E, N)
                dtu = torch.mul(dt_c, x.take(u, c0, c1), out=seg_dtu[k0:k1])  # (T, B, E)
                _chunk_states(a, dtu, x.take(x.B, c0, c1), seg_states[k0:k1 + 1], mode, work)
            # Walk the segment's chunks backwards.
            for c0 in range(s0 + (s1 - s0 - 1) // chunk * chunk, s0 - 1, -chunk):
                c1 = min(c0 + chunk, s1)
                k0, k1 = c0 - s0, c1 - s0
                n = c1 - c0
                hs = seg_states[k0:k1 + 1]  # (T+1, B, E, N)
                a, dt_c = seg_decay[k0:k1], seg_dt[k0:k1]  # (T, B, E, N), (T, B, E)
                u_c, dout_c = x.take(u, c0, c1), x.take(dout, c0, c1)  # (T, B, E) each
                B_c, C_c = x.take(x.B, c0, c1), x.take(x.C, c0, c1)  # (T, B, G, N) each
                if z is not None:
                    z_c = x.take(z, c0, c1)  # (T, B, E)
                    sig = torch.sigmoid(z_c)
                    dy = dout_c * z_c * sig  # (T, B, E), through out = y * silu(z)
                    y = _sum_state(hs[1:], C_c)  # (T, B, E), recomputed for dz
                    if D is not None:
                        y.addcmul_(u_c, D32)
                    dsilu = sig * (1 + z_c * (1 - sig))  # d silu(z) / dz
                    grad_z[:, :, c0:c1] = (dout_c * y * dsilu).permute(1, 2, 0)  # (B, E, T)
                else:
                    dy = dout_c
                du = dy * D32 if D is not None else torch.zeros_like(dy)  # (T, B, E)
                if D is not None:
                    dD += (dy * u_c).sum((0, 1))
                grad_C[..., c0:c1] = _sum_channel(hs[1:], dy, groups).permute(1, 2, 3, 0)
                # g_t = C_t * dy_t + a_{t+1} * g_{t+1}: the gradient w.r.t. h_t.
                g = grad[:n]  # (T, B, E, N)
                torch.mul(dy.view(n, batch, groups, hdim, 1),
                          C_c.view(n, batch, groups, 1, d_state),
                          out=g.view(n, batch, groups, hdim, d_state))
                g[-1] += carry
                if n > 1:
                    if mode == "loop":
                        _scan_reverse_loop(a[1:], g)
                    else:
                        a_next = work[0, :n]  # a_next[t] = a[t+1]; its last row is never read
                        a_next[:-1] = a[1:]
                        _scan_reverse_parallel(a_next, g, work[1])
                torch.mul(a[0], g[0], out=carry)
                # Input term delta*B*u, through q_t = sum_n g_t * B_t.
                q = _sum_state(g, B_c)  # (T, B, E)
                ddt = q * u_c  # (T, B, E)
                du.addcmul_(q, dt_c)
                grad_u[:, :, c0:c1] = du.permute(1, 2, 0)  # (B, E, T)
                grad_B[..., c0:c1] = _sum_channel(g, seg_dtu[k0:k1], groups).permute(1, 2, 3, 0)
                # Decay term exp(delta*A), through p_t = g_t * a_t * h_{t-1}.
                p = g.mul_(a).mul_(hs[:-1])  # (T, B, E, N); g is spent
                ddt += torch.mul(p, A32, out=scratch[:n]).sum(-1)
                dA += p.mul_(dt_c.unsqueeze(-1)).view(-1, dim, d_state).sum(0)
                if ctx.delta_softplus:
                    # d softplus(x) / dx = sigmoid(x) = 1 - exp(-softplus(x)), so x need not be kept.
                    ddt.mul_(torch.neg(dt_c).expm1_().neg_())
                dbias += ddt.sum((0, 1))
                grad_delta[:, :, c0:c1] = ddt.permute(1, 2, 0)  # (B, E, T)

        if B.dim() == 3:
            grad_B = grad_B.squeeze(1)  # (B, N, L)
        if C.dim() == 3:
            grad_C = grad_C.squeeze(1)  # (B, N, L)
        return (grad_u, grad_delta, dA.to(A.dtype), grad_B, grad_C,
                dD.to(D.dtype) if D is not None else None, grad_z,
                dbias.to(delta_bias.dtype) if delta_bias is not None else None, None, None, None)


def _decay(dt, A, out):
    """exp(delta * A): (T, B, E) x (E, N) -> out (T, B, E, N)."""
    torch.mul(dt.unsqueeze(-1), A, out=out)
    return out.exp_()


def _chunk_states(a, dtu, B_t, hs, mode, work):
    """Fill hs[1:] with a chunk's states, given the start state hs[0]; `a` is left intact.

    a: (T, B, E, N) decays; dtu: (T, B, E) delta * u; B_t: (T, B, G, N); hs: (T+1, B, E, N);
    work: (2, T, B, E, N) scratch for the parallel mode.
    """
    n, batch, dim = dtu.shape
    groups, d_state = B_t.shape[2], B_t.shape[3]
    torch.mul(dtu.view(n, batch, groups, dim // groups, 1),
              B_t.view(n, batch, groups, 1, d_state),
              out=hs[1:].view(n, batch, groups, dim // groups, d_state))
    if mode == "loop":
        _scan_loop(a, hs)
    else:
        w = work[0, :n]
        w.copy_(a)
        _scan_parallel(w, hs, work[1])


# Both contractions are written as (1, k) @ (k, m) batched products: on CPU these run several
# times faster than the matrix-vector form or a broadcast multiply and sum.
def _sum_state(h, c, out=None):
    """sum_n h[t, b, e, n] * c[t, b, g(e), n]: (T, B, E, N), (T, B, G, N) -> (T, B, E)."""
    n, batch, dim, d_state = h.shape
    groups = c.shape[2]
    rows = n * batch * groups
    hv = h.view(rows, dim // groups, d_state).transpose(1, 2)  # (T*B*G, N, H)
    cv = c.reshape(rows, 1, d_state)  # (T*B*G, 1, N)
    if out is None:
        return torch.bmm(cv, hv).view(n, batch, dim)
    torch.bmm(cv, hv, out=out.view(rows, 1, dim // groups))
    return out


def _sum_channel(h, v, groups):
    """sum_h h[t, b, g, h, n] * v[t, b, g, h]: (T, B, E, N), (T, B, E) -> (T, B, G, N)."""
    n, batch, dim, d_state = h.shape
    rows = n * batch * groups
    hv = h.view(rows, dim // groups, d_state)  # (T*B*G, H, N)
    vv = v.reshape(rows, 1, dim // groups)  # (T*B*G, 1, H)
    return torch.bmm(vv, hv).view(n, batch, groups, d_state)


# --- "whole" mode: the sequence in one piece, for short sequences on CPU -----------------------
#
# At the smoke grid's sizes (B=32, E=64, N=8, L=50-100) the chunked scan's cost is not its
# per-step loop but its (T, B, E, N) layout: every broadcast multiply has an innermost dimension
# of N=8, shorter than one AVX-512 vector, and each chunk re-copies its operands time-major. Here
# all L steps are held at once as (L, B, G, N, H) with H = E / G innermost, so the elementwise
# work runs on long contiguous rows, the inputs are transposed once, and the backward reuses the
# forward's states and decays instead of recomputing them. The whole (L, B, E, N) state is then
# in memory twice (states and decays, saved for the backward), so `selective_scan_pure` picks
# this mode only while B * L * E * N <= WHOLE_MAX_ELEMENTS.
WHOLE_MAX_ELEMENTS = 1 << 22  # 16 MB per fp32 (L, B, E, N) tensor; the smoke grid's L=100 is 1.6 M


def _time_major(x):
    """(B, E, L) -> (L, B, E), or (B, G, N, L) -> (L, B, G, N); a fresh contiguous fp32 tensor."""
    x = x.permute(2, 0, 1) if x.dim() == 3 else x.permute(3, 0, 1, 2)
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)


def _batch_last(x):
    """(L, B, E) -> (B, E, L) or (L, B, G, N) -> (B, G, N, L), contiguous."""
    x = x.permute(1, 2, 0) if x.dim() == 3 else x.permute(1, 2, 3, 0)
    return x.contiguous()


def _whole_inputs(u, delta, A, B, C, delta_bias, delta_softplus):
    """Time-major fp32 operands: u, dt (L, B, E); B, C (L, B, G, N); A as (G, N, H)."""
    dim = u.shape[1]
    B_t = _time_major(B if B.dim() == 4 else B.unsqueeze(1))  # (L, B, G, N)
    C_t = _time_major(C if C.dim() == 4 else C.unsqueeze(1))  # (L, B, G, N)
    groups, d_state = B_t.shape[2], B_t.shape[3]
    dt = _time_major(delta)  # (L, B, E)
    if delta_bias is not None:
        dt += delta_bias.float()
    if delta_softplus:
        dt = F.softplus(dt)
    A_t = A.float().view(groups, dim // groups, d_state).transpose(1, 2).contiguous()  # (G, N, H)
    return _time_major(u), dt, A_t, B_t, C_t


def _whole_forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """All L states at once: (L, B, G, N, H), H innermost; a Python loop of L in-place steps."""
    batch, dim, length = u.shape
    needs_grad = any(ctx.needs_input_grad[:8])
    u_t, dt, A_t, B_t, C_t = _whole_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    groups, d_state = B_t.shape[2], B_t.shape[3]
    hdim = dim // groups
    rows = length * batch * groups
    a = torch.mul(dt.view(length, batch, groups, 1, hdim), A_t).exp_()  # (L, B, G, N, H)
    dtu = dt * u_t  # (L, B, E)
    h = torch.mul(dtu.view(length, batch, groups, 1, hdim), B_t.unsqueeze(-1))  # (L, B, G, N, H)
    _scan_loop(a[1:], h)  # h[t] = a[t] * h[t-1] + h[t]; the start state is zero
    y = torch.bmm(C_t.view(rows, 1, d_state), h.view(rows, d_state, hdim))  # (L*B*G, 1, H)
    y = y.view(length, batch, dim)  # (L, B, E)
    if D is not None:
        y.addcmul_(u_t, D.float())
    z_t = _time_major(z) if z is not None else None  # (L, B, E)
    out = _batch_last(y * F.silu(z_t) if z is not None else y).to(u.dtype)  # (B, E, L)
    last_state = h[-1].permute(0, 1, 3, 2).reshape(batch, dim, d_state).to(A.dtype)  # (B, E, N)
    ctx.mark_non_differentiable(last_state)
    if needs_grad:  # the time-major operands too: (L, B, E)-sized, so cheap to keep, costly to redo
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h, a, u_t, dt, A_t, B_t, C_t, y, z_t)
        ctx.delta_softplus = delta_softplus
        ctx.mode = "whole"
    return out, last_state


def _whole_backward(ctx, dout):
    """Gradients of `_whole_forward` from its saved states h, decays a, operands and output y before
    the gate (all left intact, so a retained graph can run its backward again)."""
    u, delta, A, B, C, D, z, delta_bias, h, a, u_t, dt, A_t, B_t, C_t, y, z_t = ctx.saved_tensors
    batch, dim, length = u.shape
    groups, d_state = B_t.shape[2], B_t.shape[3]
    hdim = dim // groups
    rows = length * batch * groups
    dout_t = _time_major(dout)  # (L, B, E)
    grad_z = None
    if z is not None:
        sig = torch.sigmoid(z_t)
        dy = dout_t * z_t * sig  # (L, B, E), through out = y * silu(z)
        dsilu = sig * (1 + z_t * (1 - sig))  # d silu(z) / dz
        grad_z = _batch_last(dout_t.mul_(y).mul_(dsilu)).to(z.dtype)  # (B, E, L)
    else:
        dy = dout_t
    dD = (dy * u_t).sum((0, 1)).to(D.dtype) if D is not None else None  # (E,)
    du = dy * D.float() if D is not None else torch.zeros_like(dy)  # (L, B, E)
    # Sums over H, the innermost dimension: a multiply and sum beats a matrix-vector bmm here.
    dy_h = dy.view(length, batch, groups, 1, hdim)  # (L, B, G, 1, H)
    grad_C = (h * dy_h).sum(-1)  # (L, B, G, N)
    # g_t = C_t * dy_t + a_{t+1} * g_{t+1}: the gradient w.r.t. h_t, built in place of h's twin.
    g = torch.mul(C_t.unsqueeze(-1), dy_h)  # (L, B, G, N, H)
    _scan_reverse_loop(a[1:], g)
    g_rows = g.view(rows, d_state, hdim)  # (L*B*G, N, H)
    # Input term delta*B*u, through q_t = sum_n g_t * B_t.
    q = torch.bmm(B_t.view(rows, 1, d_state), g_rows).view(length, batch, dim)  # (L, B, E)
    ddt = q * u_t  # (L, B, E)
    du.addcmul_(q, dt)
    dtu = (dt * u_t).view(length, batch, groups, 1, hdim)  # (L, B, G, 1, H)
    grad_B = (g * dtu).sum(-1)  # (L, B, G, N)
    # Decay term exp(delta*A), through p_t = g_t * a_t * h_{t-1}; p_0 = 0 (zero start state).
    p = g[1:].mul_(a[1:]).mul_(h[:-1])  # (L-1, B, G, N, H); g is spent
    dt_next = dt[1:].view(length - 1, batch, groups, 1, hdim)  # (L-1, B, G, 1, H)
    dA = (p * dt_next).sum((0, 1))  # (G, N, H)
    ddt[1:] += p.mul_(A_t).sum(3).view(length - 1, batch, dim)
    return _whole_grads(ctx, dt, ddt, du, dA, grad_B, grad_C, dD, grad_z)


def _whole_grads(ctx, dt, ddt, du, dA, grad_B, grad_C, dD, grad_z):
    """The whole mode's gradients in the inputs' layouts and dtypes, from dt (after the softplus), ddt
    and du (L, B, E), ddt before the softplus, dA (G, N, H) and grad_B, grad_C (L, B, G, N)."""
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors[:8]
    dim, d_state = A.shape
    if ctx.delta_softplus:
        # d softplus(x) / dx = sigmoid(x) = 1 - exp(-softplus(x)), so x need not be kept.
        ddt.mul_(torch.neg(dt).expm1_().neg_())
    dbias = ddt.sum((0, 1))  # (E,)
    grad_B, grad_C = _batch_last(grad_B), _batch_last(grad_C)  # (B, G, N, L) each
    if B.dim() == 3:
        grad_B = grad_B.squeeze(1)  # (B, N, L)
    if C.dim() == 3:
        grad_C = grad_C.squeeze(1)  # (B, N, L)
    dA = dA.transpose(1, 2).reshape(dim, d_state)  # (E, N)
    return (_batch_last(du).to(u.dtype), _batch_last(ddt).to(delta.dtype), dA.to(A.dtype),
            grad_B.to(B.dtype), grad_C.to(C.dtype), dD, grad_z,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None, None, None, None)


def _fused_forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The "fused" mode: numba's compiled kernels (helix_sweep.models.mixer_numba) on the inputs as they
    are laid out; torch only adds the bias and applies the softplus. Saves its inputs and dt; the
    backward recomputes each batch element's states."""
    batch, dim, length = u.shape
    x = _f32(delta) + _f32(delta_bias)[:, None] if delta_bias is not None else _f32(delta)  # (B, E, L)
    dt = F.softplus(x) if delta_softplus else x
    ops = _fused_operands(u, dt, A, B, C, D, z)
    out = _empty(batch, length, dim)  # (B, L, E): the (B, E, L) result as a view
    last_state = _empty(batch, dim, A.shape[1])  # (B, E, N)
    scan_numba().fused_forward(*ops, z is not None, out.numpy(), last_state.numpy())
    last_state = last_state.to(A.dtype)
    ctx.mark_non_differentiable(last_state)
    if any(ctx.needs_input_grad[:8]):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, dt)
        ctx.delta_softplus, ctx.mode = delta_softplus, "fused"
    return out.transpose(1, 2).to(u.dtype), last_state


def _fused_backward(ctx, dout):
    u, delta, A, B, C, D, z, delta_bias, x, dt = ctx.saved_tensors
    batch, dim, length = u.shape
    d_state = A.shape[1]
    # u's and delta's gradients laid out as they are (dense, so empty_like keeps their strides), z's as
    # the mixer lays out z, (B, L, E) memory (half of in_proj's output): what consumes each reads it in order
    du, ddelta = torch.empty_like(u, dtype=torch.float32), torch.empty_like(delta, dtype=torch.float32)
    dz = _empty(batch, length, dim).transpose(1, 2) if z is not None else du  # du: a placeholder, not written
    grad_B, grad_C = _empty(batch, d_state, length), _empty(batch, d_state, length)
    dA, dD, dbias = _empty(dim, d_state).zero_(), _empty(dim).zero_(), _empty(dim).zero_()  # summed into
    ops = _fused_operands(u, dt, A, B, C, D, z)
    scan_numba().fused_backward(ops[0], _f32(x).numpy(), *ops[1:], z is not None, ctx.delta_softplus,
                                _f32(dout).numpy(), du.numpy(), ddelta.numpy(), dz.numpy(), grad_B.numpy(),
                                grad_C.numpy(), dA.numpy(), dD.numpy(), dbias.numpy())
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype),
            grad_B.to(B.dtype), grad_C.to(C.dtype), dD.to(D.dtype) if D is not None else None,
            dz.to(z.dtype) if z is not None else None,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None, None, None, None)


def _fused_operands(u, dt, A, B, C, D, z):
    """numpy views (fp32, any strides) of the kernels' shared inputs: u, dt, A, B, C, D, z (zeros for
    a missing D; u stands in for a missing z, which the kernels then do not read)."""
    D32 = _f32(D) if D is not None else _empty(u.shape[1]).zero_()
    return tuple(_f32(t).numpy() for t in (u, dt, A, B, C, D32, z if z is not None else u))


def _f32(t):
    return t.detach().float()


def _empty(*shape):
    return torch.empty(shape, dtype=torch.float32)
