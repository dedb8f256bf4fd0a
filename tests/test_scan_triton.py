"""The Triton selective scan against the pure scan: outputs, last state and every gradient.

Without CUDA the kernels run under Triton's interpreter, which must be switched on before
helix_sweep.models.scan_triton decorates them: this module sets TRITON_INTERPRET=1 at import (the
scan module imports scan_triton lazily, on the first Triton call). The interpreter's time grows with
the grid and L, so the CPU shapes are tiny; on a GPU the same tests run on CUDA tensors, plus the
study's shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helix_sweep.models import Mamba, selective_scan_pure, selective_scan_triton  # noqa: E402
from test_scan import GRAD_NAMES, make_inputs, reference_scan, rel_err, run_with_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # (batch, dim, d_state, length, groups, chunk_size, block_e, splits)
    (2, 4, 3, 37, None, 4, 2, 3),  # 10 chunks, the last ragged, in 3 parallel splits; N padded 3 -> 4
    (1, 3, 2, 1, None, None, None, None),  # a single step; E padded 3 -> 4 inside one block
    (2, 4, 3, 13, 2, 4, 2, 2),  # grouped B/C: one channel block per group; 2 splits
    (2, 4, 2, 16, None, 16, 4, 1),  # L exactly one chunk
]
OPTIONS = {
    "all": dict(drop=(), softplus=True),
    "none": dict(drop=("D", "z", "delta_bias"), softplus=False),
    "z_only": dict(drop=("D", "delta_bias"), softplus=True),
}


def _inputs(batch, dim, d_state, length, groups, drop, softplus, seed):
    inputs = make_inputs(batch, dim, d_state, length, groups=groups, seed=seed)
    for k in drop:
        inputs.pop(k)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs() * 0.3  # positive step sizes without softplus
    return {k: v.to(DEVICE) for k, v in inputs.items()}


# Every shape with every optional input, and the first shape without them (interpreter time).
@pytest.mark.parametrize("option,batch,dim,d_state,length,groups,chunk,block,splits",
                         [("all", *case) for case in CASES] + [(o, *CASES[0]) for o in ("none", "z_only")]
                         + [("none", *CASES[2])])
def test_triton_matches_pure_scan(option, batch, dim, d_state, length, groups, chunk, block, splits):
    drop, softplus = OPTIONS[option]["drop"], OPTIONS[option]["softplus"]
    inputs = _inputs(batch, dim, d_state, length, groups, drop, softplus, seed=length)
    dout = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_out, ref_grads = run_with_grads(selective_scan_pure, inputs, dout, delta_softplus=softplus)
    out, grads = run_with_grads(selective_scan_triton, inputs, dout, delta_softplus=softplus,
                                chunk_size=chunk, block_e=block, splits=splits)
    assert out.dtype == torch.float32 and out.shape == (batch, dim, length)
    assert rel_err(out, ref_out) <= 1e-5
    assert set(grads) == set(ref_grads) == {k for k in GRAD_NAMES if k in inputs}
    for name in ref_grads:
        assert grads[name].shape == inputs[name].shape, name
        assert grads[name].dtype == inputs[name].dtype, name
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


def test_triton_last_state_and_fp64_reference():
    inputs = _inputs(2, 4, 3, 19, None, (), True, seed=4)
    out, last = selective_scan_triton(**inputs, delta_softplus=True, return_last_state=True, chunk_size=4,
                                      splits=2)  # the final state comes from the last split
    ref_out, ref_last = reference_scan(**{k: v.double().cpu() for k, v in inputs.items()}, delta_softplus=True)
    assert last.shape == (2, 4, 3) and last.dtype == torch.float32
    assert rel_err(last.double().cpu(), ref_last) <= 1e-5
    assert rel_err(out.double().cpu(), ref_out) <= 1e-5


def test_triton_with_large_steps():
    # Steps of ~2 with |A| up to 12: decays down to e^-24 within one step.
    inputs = _inputs(2, 4, 8, 24, None, (), True, seed=11)
    inputs["delta_bias"] = inputs["delta_bias"] + 4.0
    dout = torch.randn(2, 4, 24, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ref_out, ref_grads = run_with_grads(selective_scan_pure, inputs, dout, delta_softplus=True)
    out, grads = run_with_grads(selective_scan_triton, inputs, dout, delta_softplus=True, chunk_size=4,
                                splits=3)  # decays of e^-24 per step carried across splits
    assert rel_err(out, ref_out) <= 1e-5
    for name in GRAD_NAMES:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_inputs_keep_fp32_state(dtype):
    inputs = {k: v.to(dtype) for k, v in _inputs(2, 4, 4, 24, None, (), True, seed=6).items()}
    dout = torch.randn(2, 4, 24, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    ref_out, ref_grads = run_with_grads(selective_scan_pure, inputs, dout, delta_softplus=True)
    out, grads = run_with_grads(selective_scan_triton, inputs, dout, delta_softplus=True, chunk_size=8)
    assert out.dtype == dtype
    # Both scans accumulate in fp32 from the same inputs: they differ by the final rounding to
    # `dtype` only (fp16 has 11 significant bits, bf16 8), not by an fp16/bf16 state.
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert rel_err(out.float(), ref_out.float()) <= tol
    for name in GRAD_NAMES:
        assert grads[name].dtype == dtype, name
        assert rel_err(grads[name].float(), ref_grads[name].float()) <= tol, name


def test_triton_saves_chunk_boundary_states_only():
    # Besides its inputs, the backward keeps the (B, E, N) state every chunk (L/T of them) and each
    # split's sum of steps (B, S, E).
    batch, dim, d_state, length, chunk = 1, 4, 4, 256, 64
    inputs = {k: v.requires_grad_(True) for k, v in _inputs(batch, dim, d_state, length, None, (), True,
                                                            seed=7).items()}
    out = selective_scan_triton(**inputs, delta_softplus=True, chunk_size=chunk, splits=2)
    own = {id(v) for v in inputs.values()}
    extra = [t for t in out.grad_fn.saved_tensors if t is not None and id(t) not in own]
    assert sum(t.numel() for t in extra) == batch * (length // chunk) * dim * d_state + batch * 2 * dim


def test_mixer_with_triton_scan_matches_pure_and_shares_state_dict():
    torch.manual_seed(0)
    pure = Mamba(4, d_state=4, expand=2, scan_impl="pure").to(DEVICE)  # d_inner 8
    tri = Mamba(4, d_state=4, expand=2, scan_impl="triton").to(DEVICE)
    tri.load_state_dict(pure.state_dict())
    x = torch.randn(2, 11, 4, device=DEVICE)  # (B, L, D)
    out_pure, out_tri = pure(x), tri(x)
    out_pure.square().sum().backward()
    out_tri.square().sum().backward()
    assert rel_err(out_tri, out_pure) <= 1e-5
    for (name, p), q in zip(pure.named_parameters(), tri.parameters()):
        assert rel_err(q.grad, p.grad) <= 1e-5, name


def test_triton_rejects_bad_blocks():
    inputs = _inputs(1, 6, 2, 4, 2, (), True, seed=8)  # groups of 3 channels
    with pytest.raises(ValueError, match="block_e"):
        selective_scan_triton(**inputs, block_e=3)
    with pytest.raises(ValueError, match="block_e=2 must divide"):
        selective_scan_triton(**inputs, block_e=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the study's shapes need a GPU")
@pytest.mark.parametrize("batch,length", [(8, 500), (2, 3000)])
def test_triton_study_shapes_on_cuda(batch, length):
    inputs = {k: v.cuda() for k, v in make_inputs(batch, 512, 32, length, seed=9).items()}
    dout = torch.randn(batch, 512, length, device="cuda")
    ref_out, ref_grads = run_with_grads(selective_scan_pure, inputs, dout, delta_softplus=True)
    out, grads = run_with_grads(selective_scan_triton, inputs, dout, delta_softplus=True)
    assert rel_err(out, ref_out) <= 1e-5
    for name in GRAD_NAMES:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-4, name
