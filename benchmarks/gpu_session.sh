#!/usr/bin/env bash
# One-shot GPU session for the selective scan (issue 11) and packing (issue 15), run from the repository
# root on a bare GPU machine: `bash benchmarks/gpu_session.sh`. Everything it produces goes under $OUT
# (default ./gpu_out):
#   env.txt           GPU, driver, torch/triton versions, what `python -m helix_sweep.models` resolves
#   tests.log         tests/test_scan.py + tests/test_scan_triton.py on CUDA (Triton compiled, not interpreted)
#   imports.log       what failed to import, when the session stops before its parts
#   dispatch.log      tests/test_scan_dispatch.py and tests/test_ddp_gpu.py (NCCL: a 1-rank group, a 1-worker
#                     trial killed and resumed)
#   mamba_build.log   only with BUILD_MAMBA=1: mamba-ssm's CUDA kernels built for this GPU, time-capped
#   gpu_check.md/.log benchmarks/gpu_check.py (scan rows pure / triton / cuda-when-built, the six variants)
#   packing.md/.log   benchmarks/packing.py: the study's shapes calibrated (step time, peak memory, GPU
#                     busy share), then k = 1, 2, 4, 8 ESC-50-shaped trials at once on the GPU, per frontend
#   calibration/<gpu>.json  the calibration file for that GPU (copy it to benchmarks/calibration/)
# Knobs: PY (python3), PARTS ("tests dispatch check packing": which parts run), BUDGET_S (gpu_check
# budget, 80), PACK_BUDGET_S (packing.py, calibration included, 170), CALIB_S (its calibration, 80),
# BUILD_MAMBA (0), BUILD_CAP_S (420). Caps: tests 140 s, dispatch 90 s, check BUDGET_S + 50 s, packing
# PACK_BUDGET_S + 40 s, so the default run ends within ~9.2 minutes (a device call allows 10); packing
# alone: PARTS=packing PACK_BUDGET_S=400 CALIB_S=200 (~7 min). With BUILD_MAMBA=1 use
# PARTS=check BUILD_CAP_S=240 BUDGET_S=150 (build + mamba test + gpu_check) in a second call.
# Offline machines (the lent H200 is one): its image has torch 2.11.0, triton, numpy, pyyaml, pytest, numba,
# pyarrow (benchmarks/h200_packages.txt) but not omegaconf, soundfile (+ cffi, pycparser) or soxr
# (benchmarks/gpu_wheels.txt): `bash benchmarks/gpu_wheels.sh` here puts their wheels in .whl/; carry
# it (device run: carry [".whl"]). They are installed with --no-deps into /tmp/helix-site, and the
# session stops at once, saying what is missing, if the imports still fail. For BUILD_MAMBA=1 add the
# mamba-ssm / causal-conv1d sdists and nvidia-cuda-nvcc to .whl/ by hand.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-80}
PACK_BUDGET_S=${PACK_BUDGET_S:-170}
CALIB_S=${CALIB_S:-80}
PARTS=${PARTS:-tests dispatch check packing}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET  # compile the kernels for the GPU
PIP=("$PY" -m pip install -q --retries 1 --timeout 10)  # offline, a fetch fails in seconds, not minutes
[ -d .whl ] && PIP+=(--no-index --find-links .whl)

if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/helix-site \
    .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/helix-site
fi
need() { "$PY" -c "import $1" 2>/dev/null || "${PIP[@]}" "$2"; }  # a machine with an index: fetch what lacks
need torch torch==2.11.0
need triton triton
need pytest pytest
need numpy numpy
need yaml pyyaml
need omegaconf omegaconf
need soundfile soundfile
need soxr soxr
# everything the parts import; stop now, not minutes in, when something is missing
if ! "$PY" -c "import helix_sweep.models, helix_sweep.training.loop, pytest, triton" >"$OUT/imports.log" 2>&1; then
  echo "stopped: the session's imports fail (see above); run benchmarks/gpu_wheels.sh here and carry .whl" \
    >>"$OUT/imports.log"
  cat "$OUT/imports.log"
  exit 1
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -m helix_sweep.models d_model=256 | tail -5
} >"$OUT/env.txt" 2>&1

if [[ " $PARTS " == *" tests "* ]]; then
  timeout 140 "$PY" -m pytest -q -p no:cacheprovider tests/test_scan.py tests/test_scan_triton.py \
    --durations=10 >"$OUT/tests.log" 2>&1; echo "exit $?" >>"$OUT/tests.log"
fi
if [[ " $PARTS " == *" dispatch "* ]]; then
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_scan_dispatch.py tests/test_ddp_gpu.py \
    >"$OUT/dispatch.log" 2>&1
  echo "exit $?" >>"$OUT/dispatch.log"
fi

if [ "${BUILD_MAMBA:-0}" = 1 ]; then
  # MAMBA_KEEP_CUDA_BUILD: newer mamba-ssm builds its Mamba-1 scan only on request; MAMBA_FORCE_BUILD:
  # compile here rather than fetch a prebuilt wheel; TORCH_CUDA_ARCH_LIST / NVCC_APPEND_FLAGS: only this
  # GPU's architecture where the setup honours them (older setups hard-code their -gencode list).
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
  start=$(date +%s)
  {
    cuda=$("$PY" -c "import torch; print(torch.version.cuda)")
    command -v nvcc || "${PIP[@]}" "nvidia-cuda-nvcc==${cuda}.*"  # nvcc from PyPI, matching torch's CUDA
    site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    nvcc=$(command -v nvcc || find "$site/nvidia" -name nvcc -type f 2>/dev/null | head -1)
    [ -n "$nvcc" ] && export PATH="$(dirname "$nvcc"):$PATH" CUDA_HOME="$(dirname "$(dirname "$nvcc")")"
    echo "nvcc: ${nvcc:-none}; CUDA_HOME=${CUDA_HOME:-unset}"
    MAMBA_KEEP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST="$arch" \
      MAX_JOBS=$(nproc) timeout "${BUILD_CAP_S:-420}" "${PIP[@]}" --no-build-isolation -v mamba-ssm causal-conv1d
    echo "build exit $? after $(( $(date +%s) - start )) s"
    "$PY" -c "import torch; from helix_sweep.models.scan import scan_impl_status, mamba_mixer_status as m
d = torch.device('cuda'); print(scan_impl_status(d)['cuda'], m(d))"
  } >"$OUT/mamba_build.log" 2>&1
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_scan.py -k mamba_kernel >>"$OUT/mamba_build.log" 2>&1
fi

if [[ " $PARTS " == *" check "* ]]; then
  timeout $(( BUDGET_S + 50 )) "$PY" benchmarks/gpu_check.py --budget-s "$BUDGET_S" >"$OUT/gpu_check.log" 2>&1
  echo "gpu_check exit $?" >>"$OUT/gpu_check.log"
fi
if [[ " $PARTS " == *" packing "* ]]; then
  # writes $OUT/packing.md and $OUT/calibration/<gpu>.json; stops starting cases at PACK_BUDGET_S
  timeout $(( PACK_BUDGET_S + 40 )) "$PY" benchmarks/packing.py --budget-s "$PACK_BUDGET_S" \
    --calibrate-budget-s "$CALIB_S" --out-dir "$OUT/calibration" >"$OUT/packing.log" 2>&1
  echo "packing exit $?" >>"$OUT/packing.log"
fi
tail -n 3 "$OUT"/*.log
