"""scan_impl dispatch with stand-in mamba_ssm packages: one that imports but whose kernels raise (a
default install after upstream made the Mamba-1 CUDA scan opt-in), and one whose scan runs but whose
causal-conv1d is absent. `auto` falls back and training runs; an explicit impl that cannot run stops
in build(), before the first step, naming what is missing and how to install it."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from helix_sweep.config import ConfigError, ModelConfig, TrainConfig, TrialSpec, load_config
from helix_sweep.models import Mamba, ScanImplUnavailable, resolve_scan_impl, scan, scan_impl_status
from helix_sweep.models.__main__ import main as models_main
from helix_sweep.training.loop import build, train_step

UPSTREAM_ERROR = ("selective_scan_cuda is not installed. The Mamba-1 CUDA selective scan is now an explicit "
                  "opt-in: reinstall mamba-ssm with MAMBA_KEEP_CUDA_BUILD=TRUE")

UNBUILT = f'''
def selective_scan_fn(*args, **kwargs):
    raise RuntimeError({UPSTREAM_ERROR!r})

def mamba_inner_fn(*args, **kwargs):
    raise RuntimeError({UPSTREAM_ERROR!r})
'''

# The scan runs (here: the project's pure scan, counted); the fused mixer fails the way mamba_ssm's
# MambaInnerFn does when causal-conv1d's extension is missing.
NO_CAUSAL_CONV1D = '''
try:
    import causal_conv1d_cuda
except ImportError:
    causal_conv1d_cuda = None
from helix_sweep.models.scan import selective_scan_pure

CALLS = []

def selective_scan_fn(*args, **kwargs):
    CALLS.append("selective_scan_fn")
    return selective_scan_pure(*args, **kwargs)

def mamba_inner_fn(*args, **kwargs):
    assert causal_conv1d_cuda is not None, "causal_conv1d_cuda is not available. Please install causal-conv1d."
'''


def _clear_caches():
    for fn in (scan.mamba_scan_status, scan.mamba_mixer_status, scan.triton_scan_status, scan.resolve_scan_impl):
        fn.cache_clear()


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """Install a stand-in mamba_ssm from source text; probes are forgotten before and after."""

    def install(interface_source: str):
        ops = tmp_path / "mamba_ssm" / "ops"
        ops.mkdir(parents=True)
        (tmp_path / "mamba_ssm" / "__init__.py").write_text("")
        (ops / "__init__.py").write_text("")
        (ops / "selective_scan_interface.py").write_text(textwrap.dedent(interface_source))
        monkeypatch.syspath_prepend(str(tmp_path))
        _clear_caches()
        return __import__("mamba_ssm.ops.selective_scan_interface", fromlist=["x"])

    yield install
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]
    _clear_caches()


def _spec(scan_impl: str, pattern: str = "MAM") -> TrialSpec:
    tokens = 12
    return TrialSpec(
        key="dispatch/test/split", experiment="dispatch", dataset="synth-commands", variant="test",
        pattern=pattern, frontend="raw", clip_seconds=tokens * 160 / 16000, num_classes=3, tokens=tokens,
        data_root="/nonexistent",
        model=ModelConfig(d_model=16, d_state=4, expand=2, num_heads=2, scan_impl=scan_impl),
        train=TrainConfig(epochs=1, batch_size=4, lr=1e-3, precision="fp32"),
    )


def _train(scan_impl: str, steps: int = 2) -> list[float]:
    s = _spec(scan_impl)
    setup = build(s, 3, n_train=4, world_size=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, s.tokens * 160, generator=g) * 0.1  # (B, T) raw waveform
    y = torch.randint(0, 3, (4,), generator=g)
    return [train_step(setup, s, x, y, g, 3, s.train.augment, global_step=i)[0] for i in range(steps)]


def test_unbuilt_kernels_fall_back_and_explicit_cuda_fails(stand_in):
    stand_in(UNBUILT)  # imports fine: import success says nothing about the kernels
    runs, why = scan_impl_status(torch.device("cpu"))["cuda"]
    assert runs is False and "MAMBA_KEEP_CUDA_BUILD=TRUE" in why and "RuntimeError" in why
    assert resolve_scan_impl("auto", torch.device("cpu")) == "pure"

    losses = _train("auto")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    with pytest.raises(ScanImplUnavailable, match=r"scan_impl=cuda cannot run on cpu.*pip install"):
        build(_spec("cuda"), 3, n_train=4, world_size=1)
    # An attention-only trial runs no scan, so its scan_impl is never resolved.
    build(_spec("cuda", pattern="AA"), 3, n_train=4, world_size=1)


def test_missing_causal_conv1d_keeps_the_scan_and_skips_the_fused_mixer(stand_in):
    interface = stand_in(NO_CAUSAL_CONV1D)
    device = torch.device("cpu")
    assert scan.mamba_scan_status(device)[0] is True
    runs, why = scan.mamba_mixer_status(device)
    assert runs is False and "causal-conv1d" in why and "causal_conv1d_cuda is not available" in why
    assert resolve_scan_impl("auto", device) == "cuda"  # the stand-in's scan really runs here
    assert resolve_scan_impl("cuda", device) == "cuda"

    interface.CALLS.clear()
    losses = _train("auto")
    assert all(torch.isfinite(torch.tensor(losses)))
    # every Mamba mixer ran conv1d in PyTorch and mamba_ssm's scan, never the fused mixer
    assert interface.CALLS and set(interface.CALLS) == {"selective_scan_fn"}


def test_without_mamba_ssm_auto_is_pure_on_cpu_and_cuda_names_the_install():
    _clear_caches()
    status = scan_impl_status(torch.device("cpu"))
    assert status["pure"][0] and not status["cuda"][0]
    assert resolve_scan_impl("auto", torch.device("cpu")) == "pure"
    with pytest.raises(ScanImplUnavailable, match="MAMBA_KEEP_CUDA_BUILD=TRUE pip install"):
        resolve_scan_impl("cuda", torch.device("cpu"))


def test_explicit_triton_needs_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _clear_caches()
    with pytest.raises(ScanImplUnavailable, match="scan_impl=triton cannot run on cpu.*CUDA device"):
        resolve_scan_impl("triton", torch.device("cpu"))


def test_bad_scan_impl_is_named():
    with pytest.raises(ConfigError, match="model.scan_impl='fast'"):
        load_config(["model.scan_impl=fast"])
    assert load_config(["model.scan_impl=triton"]).model.scan_impl == "triton"
    with pytest.raises(ValueError, match="scan_impl='fast'"):
        Mamba(16, scan_impl="fast")
    with pytest.raises(ValueError, match="scan_impl='fast'"):
        resolve_scan_impl("fast", torch.device("cpu"))


def test_models_cli_shows_the_scan_implementations(capsys):
    _clear_caches()
    assert models_main(["d_model=32", "d_state=8"]) == 0
    out = capsys.readouterr().out
    assert "scan_impl=auto runs pure on cpu" in out
    for impl in ("cuda", "triton", "pure"):
        assert f"  {impl}:" in out
