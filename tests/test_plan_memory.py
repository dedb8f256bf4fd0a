"""The cost model's memory figures (helix_sweep.training.budget) against the real model on CPU at
small L (fp32, pure-PyTorch scan in its chunked formulation and PyTorch's conv1d: what GPUs run and
the cost model describes; on CPU short sequences would otherwise take the numba "fused" mode, and the
mixer's conv its numba kernel, both keeping less).

Two measurements:
- bytes autograd saves for backward, counted exactly with saved_tensors_hooks (each storage
  once): the estimate must be within 15% (it ignores per-clip constants such as A = -exp(A_log)
  and the conv padding, which matter only at tiny L);
- peak RSS of one forward+backward in a fresh subprocess (ru_maxrss after minus before): the
  estimate must be within [0.7, 1.15] x measured (allocator slack makes RSS the larger), and the
  growth from L to 2L must match within the same bounds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helix_sweep.models import matched_d_ffn
from helix_sweep.models.frontends import num_tokens
from helix_sweep.training.budget import activation_memory_bytes, frontend_saved_bytes_per_token, saved_bytes_per_token

torch = pytest.importorskip("torch")
models = pytest.importorskip("helix_sweep.models")
from helix_sweep.models import causal_conv, scan_pure  # noqa: E402

SR = 16_000


def tokens(frontend: str, seconds: float) -> int:
    return num_tokens(frontend, int(seconds * SR))


def estimated_saved(pattern: str, frontend: str, L: int, batch: int, impl: str) -> float:
    d_ffn = matched_d_ffn(256)
    per_token = frontend_saved_bytes_per_token(frontend, "fp32") + sum(
        saved_bytes_per_token(c, L, impl, "fp32", d_ffn=d_ffn, scan_impl="reference", batch=batch)
        for c in pattern)
    return batch * L * per_token


def measured_saved(model, wav) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(wav).sum()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss.backward()
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("pattern,frontend,impl", [
    ("AAAAAA", "raw", "naive"), ("AAAAAA", "raw", "sdpa"), ("MMMMMM", "raw", "naive"),
    ("MMMAMM", "mel", "naive"),
])
def test_saved_activations_match_the_model(pattern, frontend, impl, monkeypatch):
    monkeypatch.setattr(scan_pure, "WHOLE_MAX_ELEMENTS", 0)  # the chunked scan the cost model describes
    monkeypatch.setattr(causal_conv, "conv_numba_runs", lambda: False)  # and PyTorch's conv1d + silu
    torch.manual_seed(0)
    model = models.build_classifier(pattern, frontend, 10, attention_impl=impl)
    for seconds in (1.0, 2.0) if frontend == "raw" else (2.0, 4.0):
        L, batch = tokens(frontend, seconds), 2
        got = measured_saved(model, torch.randn(batch, int(seconds * SR)))
        est = estimated_saved(pattern, frontend, L, batch, impl)
        assert est == pytest.approx(got, rel=0.15), (pattern, frontend, impl, L, got, est)


# VmHWM (peak RSS of this process image) rather than ru_maxrss, which a child inherits from the
# parent at fork and keeps across exec: under pytest it would start at the test runner's size.
PEAK_SCRIPT = """
import re, sys, torch
from helix_sweep.models import build_classifier, causal_conv, scan_pure
scan_pure.WHOLE_MAX_ELEMENTS = 0  # the chunked scan the cost model describes
causal_conv.conv_numba_runs = lambda: False  # and PyTorch's conv1d + silu
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
torch.set_num_threads(1)
pattern, frontend, impl, seconds, batch = sys.argv[1:4] + [float(sys.argv[4]), int(sys.argv[5])]
model = build_classifier(pattern, frontend, 10, attention_impl=impl)
model(torch.randn(1, 8000)).sum().backward()  # grads allocated, kernels warm
wav = torch.randn(batch, int(seconds * 16000))
before = hwm()
model(wav).sum().backward()
print(hwm() - before)
"""


def peak_rss_delta(pattern, frontend, impl, seconds, batch) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, pattern, frontend, impl,
                          str(seconds), str(batch)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
@pytest.mark.parametrize("pattern,impl", [("AAAAAA", "naive"), ("MMMMMM", "naive")])
def test_peak_memory_matches_measured_rss(pattern, impl):
    batch, seconds = 2, (4.0, 8.0)
    got = [peak_rss_delta(pattern, "raw", impl, s, batch) for s in seconds]
    est = [activation_memory_bytes(pattern, tokens("raw", s), batch, impl, "fp32", "raw",
                                   scan_impl="reference") for s in seconds]
    for g, e in zip(got, est):
        assert 0.7 * g <= e <= 1.15 * g, (pattern, got, est)
    growth_got, growth_est = got[1] - got[0], est[1] - est[0]
    assert 0.7 * growth_got <= growth_est <= 1.15 * growth_got, (pattern, got, est)
