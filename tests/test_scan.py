"""The selective scan against a plain sequential recurrence, its gradients, memory and dtypes."""

import pytest
import torch
import torch.nn.functional as F

from helix_sweep.models import scan, scan_pure
from helix_sweep.models.scan import selective_scan, selective_scan_pure

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence written out step by step (fp64 here, so it is the exact side of the check)."""
    batch, dim, length = u.shape
    dt = delta + delta_bias[:, None] if delta_bias is not None else delta
    if delta_softplus:
        dt = F.softplus(dt)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    heads = dim // B.shape[1]
    B = B.repeat_interleave(heads, dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(heads, dim=1)  # (batch, dim, N, L)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * B[:, :, :, t]
        ys.append((h * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def make_inputs(batch, dim, d_state, length, groups=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    return dict(
        u=rnd(batch, dim, length),
        delta=rnd(batch, dim, length, scale=0.5),
        # S4D-real init like the mixer, plus noise so channels differ.
        A=-(torch.arange(1, d_state + 1).float().repeat(dim, 1) * (0.5 + torch.rand(dim, 1, generator=g))
            ).to(dtype),
        B=rnd(*bc_shape),
        C=rnd(*bc_shape),
        D=rnd(dim),
        z=rnd(batch, dim, length),
        delta_bias=rnd(dim, scale=0.5) - 2.0,
    )


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_with_grads(fn, inputs, dout, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(dout)
    return out.detach(), {k: leaves[k].grad for k in GRAD_NAMES if k in leaves}


CASES = [
    # (batch, dim, d_state, length, chunk_size)
    (2, 8, 4, 37, 8),  # L not divisible by the chunk, several segments
    (3, 6, 5, 5, 8),  # L smaller than one chunk
    (2, 4, 3, 64, 16),  # L a multiple of the chunk
    (1, 5, 2, 1, None),  # a single step
    (2, 8, 4, 50, None),  # the mode's default chunk
    (2, 4, 3, 203, 4),  # several chunks per saved segment, ragged last chunk
]


@pytest.mark.parametrize("mode", scan_pure.MODES)
@pytest.mark.parametrize("batch,dim,d_state,length,chunk", CASES)
def test_scan_matches_sequential_recurrence(mode, batch, dim, d_state, length, chunk):
    inputs = make_inputs(batch, dim, d_state, length, seed=length)
    dout = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = run_with_grads(
        reference_scan, {k: v.double() for k, v in inputs.items()}, dout.double(), delta_softplus=True)
    out, grads = run_with_grads(selective_scan_pure, inputs, dout, delta_softplus=True, mode=mode,
                                chunk_size=chunk)
    assert out.dtype == torch.float32 and out.shape == (batch, dim, length)
    assert rel_err(out.double(), ref_out) <= 1e-5
    for name in GRAD_NAMES:
        assert grads[name].shape == inputs[name].shape, name
        assert rel_err(grads[name].double(), ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("mode", scan_pure.MODES)
def test_scan_with_large_steps(mode):
    # Steps of ~2 with |A| up to 12: decays down to e^-24 within one step.
    inputs = make_inputs(2, 6, 8, 40, seed=11)
    inputs["delta_bias"] = inputs["delta_bias"] + 4.0
    dout = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(4))
    ref_out, ref_grads = run_with_grads(
        reference_scan, {k: v.double() for k, v in inputs.items()}, dout.double(), delta_softplus=True)
    out, grads = run_with_grads(selective_scan_pure, inputs, dout, delta_softplus=True, mode=mode,
                                chunk_size=16)
    assert rel_err(out.double(), ref_out) <= 1e-5
    for name in GRAD_NAMES:
        assert rel_err(grads[name].double(), ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("mode", scan_pure.MODES)
def test_scan_without_optional_inputs_and_with_groups(mode, groups):
    inputs = make_inputs(2, 8, 4, 21, groups=groups, seed=3)
    for k in ("D", "z", "delta_bias"):
        inputs.pop(k)
    inputs["delta"] = inputs["delta"].abs() * 0.3  # positive step sizes, no softplus
    dout = torch.randn(2, 8, 21, generator=torch.Generator().manual_seed(2))
    if mode == "fused" and groups:  # its compiled kernels take one group; asked for explicitly, it refuses
        with pytest.raises(ValueError, match="without groups"):
            selective_scan_pure(**inputs, mode=mode)
        return
    ref_out, ref_grads = run_with_grads(
        reference_scan, {k: v.double() for k, v in inputs.items()}, dout.double())
    out, grads = run_with_grads(selective_scan_pure, inputs, dout, mode=mode, chunk_size=4)
    assert rel_err(out.double(), ref_out) <= 1e-5
    for name in ("u", "delta", "A", "B", "C"):
        assert grads[name].shape == inputs[name].shape, name
        assert rel_err(grads[name].double(), ref_grads[name]) <= 1e-5, name


def test_last_state_and_dispatch_on_cpu():
    inputs = make_inputs(2, 6, 3, 19, seed=4)
    ref_out, ref_last = reference_scan(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert last.shape == (2, 6, 3)
    assert rel_err(last.double(), ref_last) <= 1e-5
    assert rel_err(out.double(), ref_out) <= 1e-5
    # On CPU the dispatcher always takes the project's own scan.
    assert torch.equal(out, selective_scan_pure(**inputs, delta_softplus=True))


def test_cpu_mode_is_chosen_by_size(monkeypatch):
    calls = []  # the u shapes of the all-states modes ("whole" and "fused") that ran
    for name in ("_whole_forward", "_fused_forward"):
        forward = getattr(scan_pure, name)
        monkeypatch.setattr(scan_pure, name, lambda *a, f=forward: calls.append(a[1].shape) or f(*a))
    small, large = make_inputs(2, 8, 4, 30, seed=12), make_inputs(2, 8, 4, 31, seed=12)
    monkeypatch.setattr(scan_pure, "WHOLE_MAX_ELEMENTS", 2 * 8 * 4 * 30)  # B * E * N * L of `small`
    assert torch.equal(selective_scan_pure(**small, delta_softplus=True),
                       selective_scan_pure(**small, delta_softplus=True, mode="fused"))
    assert calls == [(2, 8, 30)] * 2
    assert torch.equal(selective_scan_pure(**large, delta_softplus=True),
                       selective_scan_pure(**large, delta_softplus=True, mode="loop"))
    assert calls == [(2, 8, 30)] * 2  # one step longer: the chunked loop


@pytest.mark.parametrize("mode", ["whole", "fused"])
def test_whole_mode_backward_runs_twice_on_a_retained_graph(mode):
    inputs = make_inputs(2, 8, 4, 30, seed=13)
    dout = torch.randn(2, 8, 30, generator=torch.Generator().manual_seed(5))
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    out = selective_scan_pure(**leaves, delta_softplus=True, mode=mode)
    out.backward(dout, retain_graph=True)
    first = {k: v.grad.clone() for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None
    out.backward(dout)
    for k, v in leaves.items():
        assert torch.equal(v.grad, first[k]), k


def test_inputs_are_not_modified():
    inputs = make_inputs(1, 1, 2, 1, seed=5)  # degenerate shapes where permutes are no-op views
    before = {k: v.clone() for k, v in inputs.items()}
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    selective_scan_pure(**leaves, delta_softplus=True).sum().backward()
    for k, v in before.items():
        assert torch.equal(inputs[k].detach(), v), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    inputs = make_inputs(2, 16, 8, 40, seed=6)
    ref = selective_scan_pure(**inputs, delta_softplus=True)
    half = {k: v.to(dtype) for k, v in inputs.items()}
    leaves = {k: v.requires_grad_(True) for k, v in half.items()}
    out = selective_scan_pure(**leaves, delta_softplus=True)
    assert out.dtype == dtype
    # The error is that of rounding the inputs to `dtype`, not of accumulating in it.
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert rel_err(out.float().double(), ref.double()) <= tol
    out.float().sum().backward()
    for name in GRAD_NAMES:
        assert leaves[name].grad.dtype == dtype, name
        assert torch.isfinite(leaves[name].grad.float()).all(), name


def _saved_elements(length, mode):
    inputs = {k: v.requires_grad_(True) for k, v in make_inputs(1, 16, 16, length, seed=7).items()}
    out = selective_scan_pure(**inputs, delta_softplus=True, mode=mode, chunk_size=8)
    node = out.grad_fn
    own = {id(v) for v in inputs.values()}
    extra = sum(t.numel() for t in node.saved_tensors if id(t) not in own)
    del out
    return extra


@pytest.mark.parametrize("mode", ["loop", "parallel"])
def test_saved_state_does_not_scale_with_length_times_d_state(mode):
    # Besides its inputs, the backward keeps one (B, E, N) state every ~sqrt(L) steps.
    full = {L: 1 * 16 * 16 * L for L in (400, 6400)}  # B x E x N x L
    extra = {L: _saved_elements(L, mode) for L in (400, 6400)}
    for L in full:
        assert extra[L] <= full[L] / 8, (L, extra[L])
    # 16x the length costs at most ~4x more saved state (sqrt growth).
    assert extra[6400] <= 5 * extra[400]


_MEMORY_CHILD = r"""
import json, sys, torch
from helix_sweep.models.scan import selective_scan_pure

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

def peak_growth(run):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = kib("VmRSS")
    run()
    return (kib("VmHWM") - before) * 1024

torch.set_num_threads(1)
batch, dim, d_state = 1, 64, 32
result = {}
for length in (4000, 32000):
    g = torch.Generator().manual_seed(0)
    x = dict(u=torch.randn(batch, dim, length, generator=g),
             delta=torch.randn(batch, dim, length, generator=g),
             A=-torch.rand(dim, d_state, generator=g) - 0.5,
             B=torch.randn(batch, d_state, length, generator=g),
             C=torch.randn(batch, d_state, length, generator=g),
             D=torch.randn(dim, generator=g), z=torch.randn(batch, dim, length, generator=g),
             delta_bias=torch.randn(dim, generator=g))
    for t in x.values():
        t.requires_grad_(True)
    result[f"scan{length}"] = peak_growth(
        lambda: selective_scan_pure(**x, delta_softplus=True).sum().backward())
# Control: the harness must see one (B, E, L, N) tensor when one is made.
result["control32000"] = peak_growth(lambda: torch.exp(x["delta"].detach().unsqueeze(-1) * x["A"].detach()[:, None]).sum())
print(json.dumps(result))
"""


def test_forward_backward_peak_memory_is_bounded():
    """Peak RSS growth of a fwd+bwd, measured in a fresh process (VmHWM), against the
    (B, E, L, N) state tensor a plain autograd scan would keep."""
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    growth = json.loads(res.stdout.strip().splitlines()[-1])
    full_states = 1 * 64 * 32 * 32000 * 4  # bytes of the (B, E, L, N) fp32 states, 262 MB
    io = 1 * 64 * 32000 * 4  # one (B, E, L) fp32 tensor, 8 MB
    assert growth["control32000"] >= 0.9 * full_states, growth
    # The gradients (u, delta, z: 3 x io; B, C: 2 x N/E io) and a few chunk and segment buffers.
    assert growth["scan32000"] < 6 * io, growth
    assert growth["scan32000"] < full_states / 6, growth


def test_bad_shapes_name_the_argument():
    inputs = make_inputs(2, 8, 4, 10)
    inputs["B"] = inputs["B"][:, :3]
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_pure(**inputs)
    with pytest.raises(ValueError, match="mode"):
        selective_scan_pure(**make_inputs(2, 8, 4, 10), mode="fast")


def test_cuda_kernels_do_not_run_on_cpu():
    runs, why = scan.mamba_scan_status(torch.device("cpu"))
    assert runs is False and "mamba" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["loop", "parallel"])
def test_scan_on_cuda_matches_recurrence(mode):
    inputs = make_inputs(2, 16, 8, 300, seed=8)
    dout = torch.randn(2, 16, 300, generator=torch.Generator().manual_seed(3))
    ref_out, ref_grads = run_with_grads(
        reference_scan, {k: v.double() for k, v in inputs.items()}, dout.double(), delta_softplus=True)
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    out, grads = run_with_grads(selective_scan_pure, cuda_inputs, dout.cuda(), delta_softplus=True,
                                mode=mode)
    assert rel_err(out.double().cpu(), ref_out) <= 1e-5
    for name in GRAD_NAMES:
        assert rel_err(grads[name].double().cpu(), ref_grads[name]) <= 1e-5, name


@pytest.mark.skipif(not (torch.cuda.is_available() and scan.mamba_scan_status(torch.device("cuda"))[0]),
                    reason="needs CUDA and mamba_ssm's kernels built")
def test_mamba_kernel_agrees_with_pure_scan():
    inputs = {k: v.cuda() for k, v in make_inputs(2, 16, 8, 300, seed=9).items()}
    dout = torch.randn(2, 16, 300, device="cuda")
    fused_out, fused_grads = run_with_grads(selective_scan, inputs, dout, delta_softplus=True, impl="cuda")
    pure_out, pure_grads = run_with_grads(selective_scan_pure, inputs, dout, delta_softplus=True)
    assert rel_err(fused_out, pure_out) <= 1e-4
    for name in GRAD_NAMES:
        assert rel_err(fused_grads[name], pure_grads[name]) <= 1e-3, name


def test_cpu_picks_the_fused_loops_for_short_sequences_when_numba_imports(monkeypatch):
    inputs = make_inputs(2, 8, 4, 21, seed=5)
    picked = []
    for name in ("_whole_forward", "_fused_forward"):
        forward = getattr(scan_pure, name)
        monkeypatch.setattr(scan_pure, name, lambda *a, f=forward, n=name: picked.append(n) or f(*a))
    fused = selective_scan_pure(**inputs, delta_softplus=True)
    assert picked == ["_fused_forward"]  # numba is a dependency: the compiled kernels run
    monkeypatch.setattr(scan_pure, "scan_numba_status", lambda: (False, "numba does not import (test)"))
    whole = selective_scan_pure(**inputs, delta_softplus=True)
    assert picked == ["_fused_forward", "_whole_forward"]  # without numba, the PyTorch "whole" mode
    assert rel_err(fused.double(), whole.double()) <= 1e-6  # same numbers
    with pytest.raises(ValueError, match="numba does not import"):
        selective_scan_pure(**inputs, mode="fused")


def test_a_read_only_install_with_no_writable_home_still_runs_the_compiled_kernels(tmp_path):
    # numba refuses cache=True where it finds no writable place (beside the source, NUMBA_CACHE_DIR,
    # ~/.cache); the kernels then cache in a per-user folder of the temp dir instead of not importing
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from mounts import read_only

    install, home, tmp = tmp_path / "install", tmp_path / "home", tmp_path / "tmp"
    for d in (home, tmp):
        d.mkdir()
    shutil.copytree(Path(scan_pure.__file__).parent.parent, install / "helix_sweep",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(install)}
    for where in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME"):  # no cache folder but the temp dir's
        env.pop(where, None)
    probe = ("from helix_sweep.models.scan_pure import scan_numba_status\n"
             "import helix_sweep.models.scan_pure as s\n"
             "print(s.__file__)\nprint(scan_numba_status())")
    with read_only(install), read_only(home):
        for _ in range(2):  # the second process finds the first one's cache
            done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            where, status = done.stdout.splitlines()[-2:]
            assert where.startswith(str(install)) and status.startswith("(True"), done.stdout + done.stderr[-2000:]
    cached = list((tmp / f"helix_sweep-numba-{os.getuid()}").rglob("*.nbi"))
    assert len(cached) == 4, cached  # the four kernels
    assert "caching the CPU kernels in" in done.stderr


@pytest.mark.parametrize("mode", ["whole", "fused"])
def test_scan_propagates_non_finite_values(mode):
    # the compiled kernels may reassociate sums but never assume finite values: a NaN input must
    # still reach the loss, where the training loop counts the step as non-finite
    inputs = make_inputs(2, 8, 4, 21, seed=6)
    inputs["u"][1, 3, 7] = float("nan")
    out, grads = run_with_grads(selective_scan_pure, inputs, torch.ones(2, 8, 21), delta_softplus=True, mode=mode)
    assert out[1].isnan().any() and not out[0].isnan().any()
    assert grads["A"].isnan().any()
