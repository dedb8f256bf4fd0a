"""The Mamba mixer's causal depthwise conv1d and its silu on CPU, compiled with numba (causal_conv1d_silu).

PyTorch runs this (B, E, L) depthwise convolution with a kernel of 4 through oneDNN, whose set-up
costs far more than the 4 multiply-adds per value (at the smoke grid's sizes ~0.7 ms forward and
~2 ms backward per mixer, with the silu and its gradient as two more passes and a transposing copy
for the next linear layer). These kernels do the convolution, bias and silu in one pass per batch
element, reading the input as the mixer lays it out and writing the output (B, L, E), which the
mixer's x_proj reads without a copy; the backward recomputes the pre-activation.

Shares the scan kernels' helpers (float32 exp, layout-aware row copies) and compile settings.
Legend: B batch, E channels (d_inner), L length, K kernel width.
"""

from __future__ import annotations

import numba
import numpy as np

from helix_sweep.models.scan_numba import INLINE, KERNEL, _rows, _sigmoid, _unrows, f32

_A3, _C3 = "float32[:, :, :]", "float32[:, :, ::1]"
FORWARD_SIG = f"void({_A3}, float32[:, :], float32[:], {_C3})"
BACKWARD_SIG = f"void({_A3}, float32[:, :], float32[:], {_A3}, {_A3}, float32[:, ::1], float32[::1])"


@numba.njit(inline="always", **INLINE)
def _pre_activation(xp, wt, bias, t, s):  # pragma: no cover - compiled
    """s[e] = bias[e] + sum_k wt[k, e] * xp[t + k, e], xp the input with K - 1 zero rows in front
    (E innermost, so each line vectorises)."""
    s[:] = bias
    for k in range(wt.shape[0]):
        for e in range(s.shape[0]):
            s[e] += wt[k, e] * xp[t + k, e]


@numba.njit(**INLINE)  # not inlined: compiled once, cheap to call
def _padded_rows(x, b, xp):  # pragma: no cover - compiled
    """xp[K - 1 + t, e] = x[b, e, t], with the first K - 1 rows zero (the causal padding)."""
    pad = xp.shape[0] - x.shape[2]
    xp[:pad] = 0.0
    _rows(x, b, xp[pad:])


@numba.njit(FORWARD_SIG, **KERNEL)
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


@numba.njit(BACKWARD_SIG, **KERNEL)
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
