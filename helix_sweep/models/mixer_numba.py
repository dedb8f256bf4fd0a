"""The Mamba mixer's CPU kernels, compiled with numba: the selective scan of short sequences (the
"fused" mode of `selective_scan_pure`) and the causal depthwise conv1d + silu (`causal_conv1d_silu`).
One module, because numba's cache knows only the source file of each kernel: kernels that shared
helpers across files would keep stale code after a helper changed.

The scan, two kernels, one batch element at a time, everything of that element in cache:
- `fused_forward`: the decays exp(delta * A), the recurrence, <h, C>, the D skip and the silu(z)
  gate, in one pass; it writes the output and the last state and keeps nothing else.
- `fused_backward`: recomputes that element's decays and states (L x N x E values, ~200 KB at the
  smoke sizes: cheaper than keeping them for the whole batch and reading them back), then runs the
  reverse recurrence and writes every gradient.
The inputs come in the layouts the mixer has them in ((B, E, L) views, often of (B, L, E) memory),
are read once into per-element (L, E) scratch, and the outputs are written (B, L, E): the mixer's
next linear layer reads that without a copy. The PyTorch "whole" mode spent about half its time in
those transposing copies and in the full-batch (L, B, N, E) decay and state tensors.

The conv (`conv_silu_forward` / `conv_silu_backward`): PyTorch runs the mixer's (B, E, L) depthwise
convolution with a kernel of 4 through oneDNN, whose set-up costs far more than the 4 multiply-adds
per value (at the smoke sizes ~0.7 ms forward and ~2 ms backward per mixer, with the silu and its
gradient as two more passes and a transposing copy for x_proj). These do convolution, bias and silu
in one pass per batch element, output (B, L, E); the backward recomputes the pre-activation.

`_exp`: numba's math.exp is a scalar call (the PyPI llvmlite has no SVML), 2.8x slower here than a
vectorised polynomial, and the decays are most of the work (B*L*N*E of them per call). Cephes'
single-precision exp (range reduction by ln 2, a degree-6 polynomial): within 1 ulp of torch.exp on
the decays' range; NaN propagates, overflow saturates at exp(88.7), underflow at exp(-87.3).

fastmath is limited to reassociation and contraction: the E-sums vectorise, while NaN and inf still
propagate, so a non-finite loss is still seen as one. Explicit signatures (float32, any strides) keep
one compiled version whatever the inputs' layouts; compiled on first import (~5.5 s of CPU on a Zen 5; a
sweep does it in the background, helix_sweep.run.compile_cpu_kernels) and cached next to this file
(numba's cache; `_kernel` says where in a read-only install), so later processes load it in well
under a second.

Legend: L sequence length, B batch, N d_state, E d_inner (one group), K conv kernel width.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numba
import numpy as np

log = logging.getLogger(__name__)

FASTMATH = {"reassoc", "contract"}
# numpy's error model: a division by zero gives inf or NaN, not Python's exception, whose check would
# keep every loop with a division (the sigmoids) from vectorising (10x slower)
INLINE = {"fastmath": FASTMATH, "error_model": "numpy"}
KERNEL = {"cache": True, "nogil": True, **INLINE}
f32 = np.float32


def _kernel(signature: str):
    """numba.njit(signature, **KERNEL), cached where numba finds a place: beside this file, else
    NUMBA_CACHE_DIR, else the user's cache folder. With none writable (a read-only install and HOME)
    numba refuses cache=True outright; the cache then goes to a per-user folder in the temp dir, so
    the kernels still compile once per machine rather than not at all."""
    def compile_kernel(fn):
        try:
            return numba.njit(signature, **KERNEL)(fn)
        except RuntimeError as exc:
            if "no locator available" not in str(exc) or numba.config.CACHE_DIR:
                raise
        numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"helix_sweep-numba-{os.getuid()}")
        log.warning("no writable numba cache beside %s or in the user's cache folder: caching the CPU kernels in "
                    "%s (set NUMBA_CACHE_DIR to choose)", __file__, numba.config.CACHE_DIR)
        return numba.njit(signature, **KERNEL)(fn)

    return compile_kernel


_A3, _C3 = "float32[:, :, :]", "float32[:, :, ::1]"  # any strides / C-contiguous
SCAN_FORWARD_SIG = (f"void({_A3}, {_A3}, float32[:, :], {_A3}, {_A3}, float32[:], {_A3}, boolean, "
                    f"{_C3}, {_C3})")
SCAN_BACKWARD_SIG = (f"void({_A3}, {_A3}, {_A3}, float32[:, :], {_A3}, {_A3}, float32[:], {_A3}, boolean, "
                     f"boolean, {_A3}, {_A3}, {_A3}, {_A3}, {_C3}, {_C3}, float32[:, ::1], float32[::1], "
                     f"float32[::1])")


@numba.njit(inline="always", **INLINE)
def _exp(x):  # pragma: no cover - compiled
    """exp(x) in float32 (Cephes expf), vectorisable."""
    if x < f32(-87.3):
        x = f32(-87.3)
    if x > f32(88.7):
        x = f32(88.7)
    k = np.floor(x * f32(1.44269504) + f32(0.5))
    r = x - k * f32(0.693359375) + k * f32(2.12194440e-4)
    p = f32(1.9875691500e-4)
    p = p * r + f32(1.3981999507e-3)
    p = p * r + f32(8.3334519073e-3)
    p = p * r + f32(4.1665795894e-2)
    p = p * r + f32(1.6666665459e-1)
    p = p * r + f32(5.0000001201e-1)
    y = p * r * r + r + f32(1.0)
    return y * np.int32((np.int32(k) + 127) << 23).view(np.float32)


@numba.njit(inline="always", **INLINE)
def _sigmoid(x):  # pragma: no cover - compiled
    return f32(1.0) / (f32(1.0) + _exp(-x))


@numba.njit(**INLINE)  # not inlined: compiled once, cheap to call
def _rows(src, b, dst):  # pragma: no cover - compiled
    """dst[t, i] = src[b, i, t]: one element's (I, L) slice as (L, I) scratch, read in memory order."""
    if src.strides[1] < src.strides[2]:  # a (B, L, I) layout: already rows
        for t in range(src.shape[2]):
            for i in range(src.shape[1]):
                dst[t, i] = src[b, i, t]
    else:
        for i in range(src.shape[1]):
            for t in range(src.shape[2]):
                dst[t, i] = src[b, i, t]


@numba.njit(**INLINE)  # not inlined: compiled once, cheap to call
def _unrows(src, dst, b):  # pragma: no cover - compiled
    """dst[b, i, t] = src[t, i]: the inverse of `_rows`, written in memory order."""
    if dst.strides[1] < dst.strides[2]:
        for t in range(dst.shape[2]):
            for i in range(dst.shape[1]):
                dst[b, i, t] = src[t, i]
    else:
        for i in range(dst.shape[1]):
            for t in range(dst.shape[2]):
                dst[b, i, t] = src[t, i]


@numba.njit(**INLINE)
def _element(b, u, dt, b_in, c_in, z, has_z, ut, dtt, dtu, bt, ct, zt):  # pragma: no cover - compiled
    """Batch element b's operands as (L, E) and (L, N) scratch rows, and dtu = dt * u."""
    _rows(u, b, ut)
    _rows(dt, b, dtt)
    _rows(b_in, b, bt)
    _rows(c_in, b, ct)
    if has_z:
        _rows(z, b, zt)
    for t in range(ut.shape[0]):
        for e in range(ut.shape[1]):
            dtu[t, e] = dtt[t, e] * ut[t, e]


@_kernel(SCAN_FORWARD_SIG)
def fused_forward(u, dt, A, b_in, c_in, D, z, has_z, out, last):  # pragma: no cover - compiled
    """h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t (h_{-1} = 0), y_t = <h_t, C_t> + D u_t,
    out_t = y_t * silu(z_t) (with has_z).

    u, dt, z: (B, E, L); A: (E, N); b_in, c_in: (B, N, L); D: (E,). Writes out (B, L, E) and the
    last state (B, E, N)."""
    batch, dim, length = u.shape
    d_state = A.shape[1]
    a_t = np.ascontiguousarray(A.T)  # (N, E)
    ut, dtt = np.empty((length, dim), f32), np.empty((length, dim), f32)
    dtu, zt = np.empty((length, dim), f32), np.empty((length, dim), f32)
    bt, ct = np.empty((length, d_state), f32), np.empty((length, d_state), f32)
    h, y = np.empty((d_state, dim), f32), np.empty(dim, f32)
    for b in range(batch):
        _element(b, u, dt, b_in, c_in, z, has_z, ut, dtt, dtu, bt, ct, zt)
        h[:] = 0.0
        for t in range(length):
            y[:] = 0.0
            for n in range(d_state):
                bn, cn = bt[t, n], ct[t, n]
                for e in range(dim):
                    v = _exp(dtt[t, e] * a_t[n, e]) * h[n, e] + dtu[t, e] * bn
                    h[n, e] = v
                    y[e] += cn * v
            for e in range(dim):
                v = y[e] + D[e] * ut[t, e]
                if has_z:
                    v *= zt[t, e] * _sigmoid(zt[t, e])
                out[b, t, e] = v
        for e in range(dim):
            for n in range(d_state):
                last[b, e, n] = h[n, e]


@_kernel(SCAN_BACKWARD_SIG)
def fused_backward(u, x, dt, A, b_in, c_in, D, z, has_z, softplus, dout,
                   du, ddelta, dz, grad_b, grad_c, dA, dD, dbias):  # pragma: no cover - compiled
    """Every gradient of `fused_forward`, with dt = softplus(x) (with softplus) or x.

    The reverse recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} (g = dLoss/dh_t) and its sums:
    q_t = sum_n g_t B_t (-> du, and ddt through dt*u*B), r_t = sum_n p_t A (-> ddt through the decay),
    grad_b_t = sum_e g_t dt_t u_t, grad_c_t = sum_e h_t dy_t, dA = sum_{b,t} p_t dt_t,
    with p_t = g_t a_t h_{t-1} (0 at t = 0: the start state is zero).
    u, x, dt, z, dout: (B, E, L); A: (E, N); b_in, c_in: (B, N, L); D: (E,).
    Writes du, ddelta, dz: (B, E, L) (any strides: the caller lays each out as its input),
    grad_b, grad_c: (B, N, L); adds into dA (E, N), dD, dbias (E,)."""
    batch, dim, length = u.shape
    d_state = A.shape[1]
    a_t = np.ascontiguousarray(A.T)  # (N, E)
    ut, dtt = np.empty((length, dim), f32), np.empty((length, dim), f32)
    dtu, zt = np.empty((length, dim), f32), np.empty((length, dim), f32)
    xt, dy, ypre = np.empty((length, dim), f32), np.empty((length, dim), f32), np.empty((length, dim), f32)
    dut, ddt_t, dzt = np.empty((length, dim), f32), np.empty((length, dim), f32), np.empty((length, dim), f32)
    bt, ct = np.empty((length, d_state), f32), np.empty((length, d_state), f32)
    dec, hs = np.empty((length, d_state, dim), f32), np.empty((length, d_state, dim), f32)
    g, da = np.empty((d_state, dim), f32), np.zeros((d_state, dim), f32)
    q, r = np.empty(dim, f32), np.empty(dim, f32)
    for b in range(batch):
        _element(b, u, dt, b_in, c_in, z, has_z, ut, dtt, dtu, bt, ct, zt)
        _rows(dout, b, dy)
        if softplus:
            _rows(x, b, xt)
        # this element's decays and states again, and y before the gate
        for t in range(length):
            ypre[t, :] = 0.0
            for n in range(d_state):
                bn, cn = bt[t, n], ct[t, n]
                for e in range(dim):
                    a = _exp(dtt[t, e] * a_t[n, e])
                    v = dtu[t, e] * bn
                    if t > 0:
                        v += a * hs[t - 1, n, e]
                    dec[t, n, e] = a
                    hs[t, n, e] = v
                    ypre[t, e] += cn * v
        # through the gate and the skip: dy = dLoss/dy, du starts as dy * D
        for t in range(length):
            for e in range(dim):
                y = ypre[t, e] + D[e] * ut[t, e]
                if has_z:
                    zv = zt[t, e]
                    sig = _sigmoid(zv)
                    dzt[t, e] = dy[t, e] * y * sig * (f32(1.0) + zv * (f32(1.0) - sig))
                    dy[t, e] *= zv * sig
                dD[e] += dy[t, e] * ut[t, e]
                dut[t, e] = dy[t, e] * D[e]
        g[:] = 0.0
        for t in range(length - 1, -1, -1):
            q[:] = 0.0
            r[:] = 0.0
            for n in range(d_state):
                bn, cn = bt[t, n], ct[t, n]
                acc_b = f32(0.0)
                acc_c = f32(0.0)
                for e in range(dim):
                    gv = g[n, e] + cn * dy[t, e]
                    acc_b += gv * dtu[t, e]
                    acc_c += hs[t, n, e] * dy[t, e]
                    q[e] += gv * bn
                    if t > 0:
                        p = gv * dec[t, n, e] * hs[t - 1, n, e]
                        da[n, e] += p * dtt[t, e]
                        r[e] += p * a_t[n, e]
                    g[n, e] = gv * dec[t, n, e]
                grad_b[b, n, t] = acc_b
                grad_c[b, n, t] = acc_c
            for e in range(dim):
                ddt = q[e] * ut[t, e] + r[e]
                dut[t, e] += q[e] * dtt[t, e]
                if softplus:  # d softplus(x) / dx = sigmoid(x)
                    ddt *= _sigmoid(xt[t, e])
                ddt_t[t, e] = ddt
                dbias[e] += ddt
        _unrows(dut, du, b)
        _unrows(ddt_t, ddelta, b)
        if has_z:
            _unrows(dzt, dz, b)
    for e in range(dim):
        for n in range(d_state):
            dA[e, n] += da[n, e]


# ---------------------------------------------------------------- the causal conv1d + silu
CONV_FORWARD_SIG = f"void({_A3}, float32[:, :], float32[:], {_C3})"
CONV_BACKWARD_SIG = f"void({_A3}, float32[:, :], float32[:], {_A3}, {_A3}, float32[:, ::1], float32[::1])"


@numba.njit(inline="always", **INLINE)
def _pre_activation(xp, wt, bias, t, s):  # pragma: no cover - compiled
    """s[e] = bias[e] + sum_k wt[k, e] * xp[t + k, e], xp the input with K - 1 zero rows in front
    (E innermost, so each line vectorises). The copy is a loop: numba compiles an array-to-slice
    assignment with its shape-mismatch message, ~2 s of string code per fresh compile."""
    for e in range(s.shape[0]):
        s[e] = bias[e]
    for k in range(wt.shape[0]):
        for e in range(s.shape[0]):
            s[e] += wt[k, e] * xp[t + k, e]


@numba.njit(**INLINE)  # not inlined: compiled once, cheap to call
def _padded_rows(x, b, xp):  # pragma: no cover - compiled
    """xp[K - 1 + t, e] = x[b, e, t], with the first K - 1 rows zero (the causal padding)."""
    pad = xp.shape[0] - x.shape[2]
    xp[:pad] = 0.0
    _rows(x, b, xp[pad:])


@_kernel(CONV_FORWARD_SIG)
def conv_silu_forward(x, w, bias, out):  # pragma: no cover - compiled
    """out[b, t, e] = silu(bias[e] + sum_k w[e, k] x[b, e, t - K + 1 + k]).

    x: (B, E, L), any strides; w: (E, K); bias: (E,). Writes out (B, L, E)."""
    batch, dim, length = x.shape
    width = w.shape[1]
    wt = np.ascontiguousarray(w.T)  # (K, E)
    xp, s = np.empty((length + width - 1, dim), f32), np.empty(dim, f32)
    for b in range(batch):
        _padded_rows(x, b, xp)
        for t in range(length):
            _pre_activation(xp, wt, bias, t, s)
            for e in range(dim):
                out[b, t, e] = s[e] * _sigmoid(s[e])


@_kernel(CONV_BACKWARD_SIG)
def conv_silu_backward(x, w, bias, dout, dx, dw, dbias):  # pragma: no cover - compiled
    """Gradients of `conv_silu_forward`: writes dx (B, E, L, any strides); adds into dw (E, K) and
    dbias (E,). dout: (B, E, L), any strides."""
    batch, dim, length = x.shape
    width = w.shape[1]
    pad = width - 1
    wt = np.ascontiguousarray(w.T)  # (K, E)
    xp, dsp = np.empty((length + pad, dim), f32), np.zeros((length + pad, dim), f32)
    dxt, dwt, s = np.empty((length, dim), f32), np.zeros((width, dim), f32), np.empty(dim, f32)
    ds = dsp[:length]  # ds with K - 1 zero rows behind it
    for b in range(batch):
        _padded_rows(x, b, xp)
        _rows(dout, b, ds)
        for t in range(length):  # through the silu: ds = dout * silu'(s)
            _pre_activation(xp, wt, bias, t, s)
            for e in range(dim):
                sig = _sigmoid(s[e])
                ds[t, e] *= sig * (f32(1.0) + s[e] * (f32(1.0) - sig))
                dbias[e] += ds[t, e]
        for t in range(length):  # dx_t = sum_k w_k ds_{t+K-1-k}; dw_k = sum_t ds_t x_{t-K+1+k}
            dxt[t, :] = 0.0
            for k in range(width):
                for e in range(dim):
                    dxt[t, e] += wt[k, e] * dsp[t + pad - k, e]
            for k in range(width):
                for e in range(dim):
                    dwt[k, e] += ds[t, e] * xp[t + k, e]
        _unrows(dxt, dx, b)
    for e in range(dim):
        for k in range(width):
            dw[e, k] += dwt[k, e]
