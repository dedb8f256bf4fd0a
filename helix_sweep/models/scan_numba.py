"""The CPU selective scan's inner loops, compiled with numba: the "fused" mode of `selective_scan_pure`.

The "whole" mode (scan_pure) holds all L states of a short sequence at once and spends its time in
~15 full passes over the (L, B, N, H) tensors plus 2L small in-place steps. These two kernels do the
forward recurrence with its output, and the reverse recurrence with every gradient it feeds, in one
pass each, with H (d_inner) innermost so the compiler vectorises it. The decays exp(delta * A) still
come from one vectorised torch.exp (numba's scalar exp would cost more than everything else here).

fastmath is limited to reassociation and contraction: the H-sums vectorise, while NaN and inf still
propagate, so a non-finite loss is still seen as one. Compiled on first use and cached next to this
file (numba's cache), so later processes load it in well under a second.

Legend: L sequence length, B batch, N d_state, H d_inner (one group).
"""

from __future__ import annotations

import numba
import numpy as np

FASTMATH = {"reassoc", "contract"}


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True)
def scan_forward(a, dtu, b_in, c_in, h, y):  # pragma: no cover - compiled
    """h_t = a_t * h_{t-1} + dtu_t * B_t (h_{-1} = 0), y_t = sum_n C_t[n] * h_t[n].

    a, h: (L, B, N, H); dtu, y: (L, B, H); b_in, c_in: (L, B, N). Writes h and y."""
    length, batch, d_state, dim = a.shape
    for b in range(batch):
        for t in range(length):
            y[t, b, :] = 0.0
            for n in range(d_state):
                bn, cn = b_in[t, b, n], c_in[t, b, n]
                if t == 0:
                    for e in range(dim):
                        v = dtu[t, b, e] * bn
                        h[t, b, n, e] = v
                        y[t, b, e] += cn * v
                else:
                    for e in range(dim):
                        v = a[t, b, n, e] * h[t - 1, b, n, e] + dtu[t, b, e] * bn
                        h[t, b, n, e] = v
                        y[t, b, e] += cn * v


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True)
def scan_backward(a, h, dtu, dt, a_coef, b_in, c_in, dy, q, r, grad_b, grad_c, grad_a):  # pragma: no cover
    """The reverse recurrence g_t = C_t * dy_t + a_{t+1} * g_{t+1} (g: dLoss/dh_t) and its sums:

    q_t = sum_n g_t B_t (-> du, ddelta through delta*u*B), r_t = sum_n p_t A (-> ddelta through the
    decay), grad_b_t = sum_e g_t dtu_t, grad_c_t = sum_e h_t dy_t, grad_a = sum_{t,b} p_t dt_t,
    with p_t = g_t a_t h_{t-1} (0 at t = 0: the start state is zero).
    a, h: (L, B, N, H); dtu, dt, dy, q, r: (L, B, H); a_coef: (N, H); b_in, c_in, grad_b, grad_c:
    (L, B, N); grad_a: (N, H), accumulated into."""
    length, batch, d_state, dim = a.shape
    g = np.zeros((d_state, dim), dtype=a.dtype)
    for b in range(batch):
        g[:] = 0.0
        for t in range(length - 1, -1, -1):
            q[t, b, :] = 0.0
            r[t, b, :] = 0.0
            for n in range(d_state):
                bn, cn = b_in[t, b, n], c_in[t, b, n]
                acc_b = 0.0
                acc_c = 0.0
                if t > 0:
                    for e in range(dim):
                        gv = g[n, e] + cn * dy[t, b, e]
                        acc_b += gv * dtu[t, b, e]
                        acc_c += h[t, b, n, e] * dy[t, b, e]
                        q[t, b, e] += gv * bn
                        p = gv * a[t, b, n, e] * h[t - 1, b, n, e]
                        grad_a[n, e] += p * dt[t, b, e]
                        r[t, b, e] += p * a_coef[n, e]
                        g[n, e] = gv * a[t, b, n, e]
                else:
                    for e in range(dim):
                        gv = g[n, e] + cn * dy[t, b, e]
                        acc_b += gv * dtu[t, b, e]
                        acc_c += h[t, b, n, e] * dy[t, b, e]
                        q[t, b, e] += gv * bn
                grad_b[t, b, n] = acc_b
                grad_c[t, b, n] = acc_c
