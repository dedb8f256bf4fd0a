"""Cost, memory and feasibility planner for a sweep grid (pure functions; no Ray, no MLflow).

One model, stated once:

- Parameters: `count_params` (the SPEC's matching rule; one function so the model package's
  authoritative counter can replace it).
- Memory: what autograd keeps for backward, per token and per layer (`saved_bytes_per_token`),
  plus the largest transient one layer needs while it runs, plus weights/grads/AdamW state and a
  fixed CUDA reserve. Naive attention keeps (B, heads, L, L) softmax weights; SDPA (flash /
  memory-efficient kernels) keeps O(B L D). The fused Mamba scan keeps O(B L E) (its states only at
  chunk boundaries); the pure-PyTorch reference scan also keeps O(B L E N) states.
- Time: per optimizer step, dense FLOPs at an effective matmul rate, selective-scan state updates
  at an effective rate, activation traffic at an effective bandwidth, plus a fixed per-step cost
  (data, augmentation, optimizer, launches). The rates are assumptions for an L40S-class 48 GB
  GPU (`Gpu`), overridable; they are meant for ordering, feasibility and budgets, not for promises.

Legend: B batch, L tokens, D d_model, E d_inner, N d_state, R dt_rank, H heads, F d_ffn.
"""

from __future__ import annotations

import heapq
import math
import sys
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterable, Sequence

GIB = 1024**3
SAMPLE_RATE = 16_000
RAW_STRIDE = 160  # raw frontend: Conv1d kernel = stride = 160 samples per token
MEL_HOP, MEL_BINS, MEL_PATCH = 512, 128, 16

ATTENTION_IMPLS = ("naive", "sdpa")
PRECISIONS = ("fp16", "bf16", "fp32")
SCAN_IMPLS = ("fused", "reference")
FEASIBILITY = ("ok", "slow", "oom")
SLOW_FACTOR = 2.0  # the study's "slow": more than 2x pure Mamba's wall time on the same data


# ----------------------------------------------------------------------------- trial input


@dataclass(frozen=True)
class PlanTrial:
    """What the planner needs to know about one trial (the grid expansion builds these)."""

    key: str  # unique trial key, e.g. "esc50/helix/raw/fold1"
    pattern: str  # layer types, index 0 first: "M" BiMamba, "A" attention, e.g. "MMMAMM"
    frontend: str  # "raw" or "mel"
    tokens: int  # tokens per clip after the frontend
    epochs: int
    train_clips: int  # clips per training epoch
    eval_clips: int = 0  # clips evaluated (forward only) after every epoch
    batch_size: int = 32  # effective batch of the protocol
    d_model: int = 256
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    num_heads: int = 4
    num_classes: int = 50
    attention_impl: str = "naive"  # "naive" (explicit softmax) or "sdpa"
    precision: str = "fp16"  # "fp16"/"bf16" mixed precision (autocast), or "fp32"
    workers: int = 1  # DDP workers (one GPU each) sharing the effective batch


# Clips per epoch (train, eval) of the grid's datasets (search_spaces/datasets.yaml names): the
# public split sizes; the speaker-ID sets assume 80/20 of the stitched clips (train-clean-100:
# 100.6 h -> 12,072 clips of 30 s; VoxPopuli en transcribed: 543 h -> 6,516 clips of 300 s).
# Concat Speech Commands: one joined clip per source clip (its label = the first clip's).
DATASET_CLIPS = {
    "esc50": (1_600, 400),
    "urbansound8k": (7_859, 873),
    "speechcommands": (84_843, 11_005),
    "speechcommands-concat": (84_843, 11_005),
    "librispeech": (9_658, 2_414),
    "voxpopuli": (5_213, 1_303),
}
SYNTHETIC_CLIPS = (512, 128)  # built-in synthetic tasks: small, the figure only orders them


def _from_grid_trial(obj: Any) -> PlanTrial:
    """Adapt helix_sweep.config.TrialSpec (nested model/train/resources sections)."""
    model, train, res = obj.model, obj.train, obj.resources
    if getattr(obj, "synthetic", False):
        clips = SYNTHETIC_CLIPS
    elif obj.dataset in DATASET_CLIPS:
        clips = DATASET_CLIPS[obj.dataset]
    else:
        raise ValueError(f"trial {obj.key!r}: no clip counts for dataset {obj.dataset!r}; "
                         f"add it to helix_sweep.plan.DATASET_CLIPS")
    precision = "fp16" if train.precision == "auto" else train.precision  # auto: fp16 on GPU
    return PlanTrial(obj.key, obj.pattern, obj.frontend, obj.tokens, train.epochs, clips[0],
                     clips[1], train.batch_size, model.d_model, model.d_state, model.d_conv,
                     model.expand, model.num_heads, obj.num_classes, model.attention_impl,
                     precision, res.num_workers)


def as_trial(obj: Any) -> PlanTrial:
    """A PlanTrial from a PlanTrial, the grid's trial spec (helix_sweep.config.TrialSpec), a
    mapping, or any object with the same attribute names."""
    if isinstance(obj, PlanTrial):
        trial = obj
    elif all(hasattr(obj, a) for a in ("model", "train", "resources", "dataset")):
        trial = _from_grid_trial(obj)
    else:
        names = [f.name for f in fields(PlanTrial)]
        get = obj.get if isinstance(obj, dict) else (lambda n, d=None: getattr(obj, n, d))
        values = {n: get(n) for n in names if get(n) is not None}
        missing = [n for n in ("key", "pattern", "frontend", "tokens", "epochs", "train_clips")
                   if n not in values]
        if missing:
            raise ValueError(f"trial {values.get('key', obj)!r}: missing fields {missing}")
        trial = PlanTrial(**values)
    _check_trial(trial)
    return trial


def _check_trial(t: PlanTrial) -> None:
    where = f"trial {t.key!r}"
    if not t.pattern or set(t.pattern) - {"M", "A"}:
        raise ValueError(f"{where}: pattern={t.pattern!r} must be a non-empty string of 'M'/'A'")
    if t.frontend not in ("raw", "mel"):
        raise ValueError(f"{where}: frontend={t.frontend!r} must be 'raw' or 'mel'")
    if t.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"{where}: attention_impl={t.attention_impl!r} not in {ATTENTION_IMPLS}")
    if t.precision not in PRECISIONS:
        raise ValueError(f"{where}: precision={t.precision!r} not in {PRECISIONS}")
    for name in ("tokens", "epochs", "train_clips", "batch_size", "workers"):
        if getattr(t, name) < 1:
            raise ValueError(f"{where}: {name}={getattr(t, name)!r} must be >= 1")
    if t.batch_size % t.workers:
        raise ValueError(f"{where}: batch_size={t.batch_size} not divisible by workers={t.workers}")


# ----------------------------------------------------------------------------- tokens


def raw_tokens(samples: int) -> int:
    """Tokens of the raw frontend (Conv1d kernel = stride = 160) for `samples` at 16 kHz."""
    return samples // RAW_STRIDE


def mel_tokens(samples: int) -> int:
    """Tokens of the mel frontend: F = 1 + floor(T / 512) frames (center=True), 16x16 patches."""
    frames = 1 + samples // MEL_HOP
    return (MEL_BINS // MEL_PATCH) * (frames // MEL_PATCH)


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamCount:
    mamba_mixer: int  # one selective SSM mixer (mamba_ssm's Mamba)
    mamba_layer: int  # one BiMamba block: LN + 2 mixers + Wout
    attention_layer: int  # one attention block with the matched FFN
    d_ffn: int
    frontend: int
    head: int
    layers: tuple[int, ...]  # per layer, index 0 first
    total: int


def count_params(pattern: str, frontend: str = "raw", num_classes: int = 50, d_model: int = 256,
                 d_state: int = 32, d_conv: int = 4, expand: int = 2) -> ParamCount:
    """Parameter counts by the SPEC's matching rule (the model package holds the authoritative
    counter; this is the planner's own, kept in one function so it can be swapped for that one)."""
    d, E, N = d_model, expand * d_model, d_state
    R = math.ceil(d / 16)
    mixer = (d * 2 * E  # in_proj, no bias
             + E * d_conv + E  # depthwise conv1d with bias
             + E * (R + 2 * N)  # x_proj, no bias
             + R * E + E  # dt_proj with bias
             + E * N + E  # A_log, D
             + E * d)  # out_proj, no bias
    mamba_layer = 2 * d + 2 * mixer + (2 * d * d + d)  # LN, MambaF + MambaB, Wout with bias
    p_mha, p_norms = 4 * d * d + 4 * d, 4 * d
    d_ffn = (mamba_layer - p_mha - p_norms) // (2 * d + 1)
    attention_layer = p_mha + p_norms + 2 * d * d_ffn + d_ffn + d
    front = (RAW_STRIDE * d + d) if frontend == "raw" else (MEL_PATCH * MEL_PATCH * d + d)
    front += 2 * d  # LayerNorm after the patch conv
    head = 2 * d + d * num_classes + num_classes
    layers = tuple(mamba_layer if c == "M" else attention_layer for c in pattern)
    return ParamCount(mixer, mamba_layer, attention_layer, d_ffn, front, head, layers,
                      front + sum(layers) + head)


# ----------------------------------------------------------------------------- memory


def _dtype_bytes(precision: str) -> tuple[int, int]:
    """(bytes of matmul outputs / matmul inputs saved, bytes of fp32 tensors)."""
    return (4, 4) if precision == "fp32" else (2, 4)


def saved_bytes_per_token(layer: str, tokens: int, attention_impl: str = "naive",
                          precision: str = "fp16", d_model: int = 256, d_state: int = 32,
                          expand: int = 2, num_heads: int = 4, d_ffn: int | None = None,
                          scan_impl: str = "fused", batch: int = 1) -> float:
    """Bytes autograd keeps for backward, per token, for one layer of type "M" or "A".
    (`batch` matters only for the reference scan, whose chunk length depends on it.)

    Under autocast, LayerNorm and softmax run in fp32 and every Linear saves its input cast to
    half precision, so a tensor can be kept twice (fp32 for the norm, half for the matmul).
    """
    h, f = _dtype_bytes(precision)
    cast = h if precision != "fp32" else 0  # extra half copy that autocast makes for a matmul
    d, E, N, H = d_model, expand * d_model, d_state, num_heads
    R = math.ceil(d / 16)
    if layer == "M":
        # LN input (fp32) + LN output in both directions cast for in_proj (flip copies it).
        out = f * d + 2 * (cast or f) * d
        if scan_impl == "fused":
            # mamba_inner_fn (checkpoint_lvl 1): xz (2E), x_dbl (R+2N), scan out (E), gated out (E);
            # conv output and delta are recomputed in backward.
            per_mixer = h * (2 * E + (R + 2 * N) + 2 * E)
        else:
            # pure-PyTorch path (helix_sweep.models.scan): xz (2E), conv out, silu out and its
            # contiguous copy for x_proj, delta, y (E each), x_dbl (R+2N), contiguous B and C
            # (2N), plus one fp32 state (E N) every K ~ sqrt(L) steps for the backward.
            chunk = reference_scan_chunk(tokens, batch, E, N)
            states = math.ceil(tokens / reference_scan_segment(tokens, chunk))
            per_mixer = h * (7 * E + R + 4 * N) + f * E * N * states / tokens
        out += 2 * per_mixer
        out += (cast or f) * 2 * d  # [Yf ; Yb] saved by Wout
        return out
    if layer == "A":
        if d_ffn is None:
            d_ffn = count_params("A", d_model=d_model, d_state=d_state, expand=expand).d_ffn
        out = f * d + (cast or f) * d  # LN1 input (fp32), its output cast for the QKV projection
        out += h * 3 * d  # q, k, v
        if attention_impl == "naive":
            # softmax output (fp32 under autocast) and its half copy for attn @ v: H L per token
            out += (f + cast) * H * tokens
        else:
            out += h * d + f * H  # SDPA keeps its output and the log-sum-exp only
        out += h * d  # attention output saved by the out projection
        out += f * d + (cast or f) * d  # LN2 input (fp32), its output cast for FFN1
        out += 2 * h * d_ffn  # GELU input, FFN2 input
        return out
    raise ValueError(f"layer type {layer!r} must be 'M' or 'A'")


def reference_scan_chunk(tokens: int, batch: int = 1, d_inner: int = 512, d_state: int = 32,
                         budget: int = 1 << 20, low: int = 4, high: int = 64) -> int:
    """Chunk length of the pure scan's CPU loop: the largest power of two whose (T, B, E, N)
    buffer fits `budget` elements, clamped to [low, high] and L. Mirrors
    helix_sweep.models.scan._chunk_len (mode "loop"); update both together."""
    fit = max(1, budget // (batch * d_inner * d_state))
    return min(max(low, 1 << (fit.bit_length() - 1)), high, tokens)


def reference_scan_segment(tokens: int, chunk: int = 8) -> int:
    """Steps between the states the pure scan keeps (a multiple of its chunk near sqrt(L));
    mirrors helix_sweep.models.scan._segment_len."""
    k = max(1, round(math.sqrt(tokens) / chunk)) * chunk
    return min(k, math.ceil(tokens / chunk) * chunk)


def transient_bytes_per_token(layer: str, tokens: int, attention_impl: str = "naive",
                              precision: str = "fp16", d_model: int = 256, d_state: int = 32,
                              expand: int = 2, num_heads: int = 4, d_ffn: int | None = None,
                              scan_impl: str = "fused", batch: int = 1) -> float:
    """Extra bytes per token one layer needs while it runs (gradients and buffers in flight)."""
    h, f = _dtype_bytes(precision)
    d, E, N, H = d_model, expand * d_model, d_state, num_heads
    if layer == "A" and attention_impl == "naive":
        # grad of the half weights, of the fp32 softmax output and of the scores: H L each
        return (h + f + f) * H * tokens + 4 * f * d
    if layer == "A":
        d_ffn = d_ffn or 4 * d
        return 3 * f * max(d_ffn, 3 * d)
    if scan_impl == "fused":
        return 3 * f * 2 * E  # grads of xz and of the scan inputs of one mixer
    # pure scan backward: time-major fp32 copies, recomputed dt/dt*u, and the gradients of
    # u, delta, z, xz and the conv, ~18 E per token (measured on CPU: 35 KB/token at D=256);
    # per clip: 4 chunk buffers of (T, E, N) and one recomputed segment of K states
    chunk = reference_scan_chunk(tokens, batch, E, N)
    return f * 18 * E + f * E * N * (4 * chunk + 1 + reference_scan_segment(tokens, chunk)) / tokens


def frontend_saved_bytes_per_token(frontend: str, precision: str = "fp16",
                                   d_model: int = 256) -> float:
    """Frontend input patch (cast for the conv), conv output and the LayerNorm's input."""
    h, f = _dtype_bytes(precision)
    patch = RAW_STRIDE if frontend == "raw" else MEL_PATCH * MEL_PATCH
    return h * patch + (h + f) * d_model + f * d_model  # + final LN input of the head


def activation_memory_bytes(pattern: str, tokens: int, batch: int, attention_impl: str = "naive",
                            precision: str = "fp16", frontend: str = "raw", d_model: int = 256,
                            d_state: int = 32, expand: int = 2, num_heads: int = 4,
                            scan_impl: str = "fused") -> float:
    """Peak activation bytes of one forward+backward: everything kept for backward plus the
    largest per-layer transient, for `batch` clips of `tokens` tokens."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={attention_impl!r} not in {ATTENTION_IMPLS}")
    if scan_impl not in SCAN_IMPLS:
        raise ValueError(f"scan_impl={scan_impl!r} not in {SCAN_IMPLS}")
    d_ffn = count_params("A", d_model=d_model, d_state=d_state, expand=expand).d_ffn
    kw = dict(attention_impl=attention_impl, precision=precision, d_model=d_model,
              expand=expand, num_heads=num_heads, d_ffn=d_ffn)
    saved = frontend_saved_bytes_per_token(frontend, precision, d_model)
    kw.update(d_state=d_state, scan_impl=scan_impl, batch=batch)
    saved += sum(saved_bytes_per_token(c, tokens, **kw) for c in pattern)
    transient = max(transient_bytes_per_token(c, tokens, **kw) for c in pattern)
    return batch * tokens * (saved + transient)


@dataclass(frozen=True)
class Gpu:
    """Effective rates of one GPU. Defaults: an L40S-class card (48 GB, 362 dense fp16 TFLOP/s
    peak, 864 GB/s), with efficiencies assumed for a d_model=256 model whose matmuls are small.
    Calibrated (see benchmarks/RESULTS.md) so the study's pattern comes out: Speech Commands
    ~12 GPU-hours per variant, 300 s speaker ID ~65 GPU-hours, Table 1's slow/oom cells."""

    memory_gb: float = 48.0
    matmul_tflops: float = 40.0  # dense projections/FFN/convs, fp16 (fp32: a quarter)
    attention_tflops: float = 20.0  # L^2 matmuls of naive attention (batched, head dim 64)
    flash_tflops: float = 60.0  # fused SDPA kernels, forward+backward FLOPs
    scan_updates_per_s: float = 4.0e11  # selective-scan state updates (fused kernel)
    bandwidth_gbs: float = 500.0  # effective HBM bandwidth for activation traffic
    traffic_factor: float = 4.0  # saved bytes written (fwd), read (bwd), grad written and read
    step_overhead_s: float = 0.10  # per optimizer step: data, augmentation, optimizer, launches
    micro_step_overhead_s: float = 0.01  # per micro-batch (launch latency of ~100 kernels)
    reserve_gb: float = 1.5  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack


L40S = Gpu()


def static_memory_bytes(trial: PlanTrial) -> float:
    """Weights + grads + AdamW moments in fp32, plus autocast's half copies of the weights."""
    p = count_params(trial.pattern, trial.frontend, trial.num_classes, trial.d_model,
                     trial.d_state, trial.d_conv, trial.expand).total
    return p * (16 + (0 if trial.precision == "fp32" else 2))


def training_memory_bytes(trial: PlanTrial, micro_batch: int, gpu: Gpu = L40S,
                          scan_impl: str = "fused") -> float:
    """Peak GPU memory of one training micro-step on one worker."""
    t = as_trial(trial)
    act = activation_memory_bytes(t.pattern, t.tokens, micro_batch, t.attention_impl,
                                  t.precision, t.frontend, t.d_model, t.d_state, t.expand,
                                  t.num_heads, scan_impl)
    return act + static_memory_bytes(t) + gpu.reserve_gb * GIB


class InfeasibleTrial(ValueError):
    """Even a micro-batch of one clip does not fit the GPU."""


def choose_micro_batch(trial: Any, gpu_memory_gb: float = 48.0, safety: float = 0.8,
                       workers: int | None = None, gpu: Gpu = L40S) -> tuple[int, int]:
    """(micro_batch, grad_accum_steps) per worker: the largest micro-batch dividing the worker's
    share of the effective batch whose peak memory fits `safety * gpu_memory_gb`; accumulation
    then keeps micro_batch * grad_accum_steps * workers == batch_size."""
    t = as_trial(trial)
    workers = workers or t.workers
    if t.batch_size % workers:
        raise ValueError(f"trial {t.key!r}: batch_size={t.batch_size} not divisible by "
                         f"workers={workers}")
    per_worker = t.batch_size // workers
    budget = safety * gpu_memory_gb * GIB
    for micro in sorted((m for m in range(1, per_worker + 1) if per_worker % m == 0), reverse=True):
        if training_memory_bytes(t, micro, gpu) <= budget:
            return micro, per_worker // micro
    need = training_memory_bytes(t, 1, gpu) / GIB
    raise InfeasibleTrial(f"trial {t.key!r}: one clip of {t.tokens} tokens needs {need:.1f} GiB "
                          f"> {safety:.0%} of {gpu_memory_gb} GB ({t.attention_impl} attention)")


# ----------------------------------------------------------------------------- compute


def _layer_flops_per_token(layer: str, tokens: int, d_model: int, d_state: int, d_conv: int,
                           expand: int, d_ffn: int) -> tuple[float, float, float]:
    """Forward (dense matmul FLOPs, L^2 attention FLOPs, scan state updates) per token."""
    d, E, N = d_model, expand * d_model, d_state
    R = math.ceil(d / 16)
    if layer == "M":
        mixer = 2 * (d * 2 * E + E * (R + 2 * N) + R * E + E * d) + 2 * E * d_conv
        return 2 * mixer + 2 * (2 * d) * d, 0.0, 2 * E * N
    # QKV + output projections, FFN; QK^T and attn @ V are 2 L D each
    return 2 * 4 * d * d + 2 * 2 * d * d_ffn, 4.0 * tokens * d, 0.0


def flops_per_step(trial: Any) -> float:
    """Forward+backward FLOPs of one optimizer step (effective batch), backward = 2x forward;
    the selective scan counted at ~9 FLOPs per state update (the Mamba paper's count)."""
    t = as_trial(trial)
    dense, quad, scan = _flops_per_token(t)
    return 3.0 * t.batch_size * t.tokens * (dense + quad + 9.0 * scan)


def _flops_per_token(t: PlanTrial) -> tuple[float, float, float]:
    d_ffn = count_params("A", d_model=t.d_model, d_state=t.d_state, d_conv=t.d_conv,
                         expand=t.expand).d_ffn
    patch = RAW_STRIDE if t.frontend == "raw" else MEL_PATCH * MEL_PATCH
    dense, quad, scan = 2.0 * patch * t.d_model, 0.0, 0.0
    for c in t.pattern:
        a, b, s = _layer_flops_per_token(c, t.tokens, t.d_model, t.d_state, t.d_conv, t.expand,
                                         d_ffn)
        dense, quad, scan = dense + a, quad + b, scan + s
    return dense, quad, scan


def step_seconds(trial: Any, micro_batch: int | None = None, gpu: Gpu = L40S) -> float:
    """Wall seconds of one optimizer step on each of the trial's workers."""
    t = as_trial(trial)
    if micro_batch is None:
        micro_batch, _ = choose_micro_batch(t, gpu.memory_gb, gpu=gpu)
    clips = t.batch_size / t.workers
    return _compute_seconds(t, clips, gpu, backward=True) + gpu.step_overhead_s \
        + gpu.micro_step_overhead_s * math.ceil(clips / micro_batch)


def _compute_seconds(t: PlanTrial, clips: float, gpu: Gpu, backward: bool) -> float:
    passes = 3.0 if backward else 1.0
    dense, quad, scan = _flops_per_token(t)
    tokens = clips * t.tokens
    mm = gpu.matmul_tflops * (0.25 if t.precision == "fp32" else 1.0) * 1e12
    seconds = passes * tokens * dense / mm + passes * tokens * scan / gpu.scan_updates_per_s
    if t.attention_impl == "naive":
        seconds += passes * tokens * quad / (gpu.attention_tflops * 1e12)
    else:  # flash backward recomputes the scores: ~2.5x forward
        seconds += (3.5 if backward else 1.0) * tokens * quad / (gpu.flash_tflops * 1e12)
    d_ffn = count_params("A", d_model=t.d_model, d_state=t.d_state, expand=t.expand).d_ffn
    saved = sum(saved_bytes_per_token(c, t.tokens, t.attention_impl, t.precision, t.d_model,
                                      t.d_state, t.expand, t.num_heads, d_ffn) for c in t.pattern)
    traffic = gpu.traffic_factor if backward else 1.0
    return seconds + traffic * tokens * saved / (gpu.bandwidth_gbs * 1e9)


def estimate_gpu_hours(trial: Any, gpu: Gpu = L40S, micro_batch: int | None = None) -> float:
    """GPU-hours of the whole trial: epochs x (training steps + a forward pass over eval_clips),
    summed over its workers."""
    t = as_trial(trial)
    steps = math.ceil(t.train_clips / t.batch_size)
    train = steps * step_seconds(t, micro_batch, gpu)  # per worker, all workers in parallel
    evals = _compute_seconds(t, t.eval_clips / t.workers, gpu, backward=False) \
        + math.ceil(t.eval_clips / t.batch_size) * gpu.micro_step_overhead_s
    return t.epochs * (train + evals) * t.workers / 3600.0


def feasibility(trial: Any, gpu_memory_gb: float = 48.0, safety: float = 0.8,
                gpu: Gpu = L40S) -> str:
    """"oom" when one clip does not fit, "slow" when the trial takes more than SLOW_FACTOR x the
    wall time of pure Mamba on the same data, else "ok" (the study's Table 1 categories)."""
    t = as_trial(trial)
    gpu = replace(gpu, memory_gb=gpu_memory_gb)
    try:
        micro, _ = choose_micro_batch(t, gpu_memory_gb, safety, gpu=gpu)
    except InfeasibleTrial:
        return "oom"
    reference = replace(t, pattern="M" * len(t.pattern))
    ref_micro, _ = choose_micro_batch(reference, gpu_memory_gb, safety, gpu=gpu)
    ratio = step_seconds(t, micro, gpu) / step_seconds(reference, ref_micro, gpu)
    return "slow" if ratio > SLOW_FACTOR else "ok"


# ----------------------------------------------------------------------------- scheduling




def _job(j: Any) -> tuple[float, int]:
    return (float(j[0]), int(j[1])) if isinstance(j, (tuple, list)) else (float(j), 1)


def lower_bound(durations: Sequence[Any], n_gpus: int) -> float:
    """max(total GPU-time / N, longest job): no schedule can finish sooner."""
    jobs = [_job(j) for j in durations]
    if not jobs:
        return 0.0
    return max(sum(d * g for d, g in jobs) / n_gpus, max(d for d, _ in jobs))


def simulate_makespan(durations: Sequence[Any], n_gpus: int, order: str = "fifo") -> float:
    """Makespan of greedy list scheduling on n_gpus, as Tune does it: whenever GPUs free up, start
    the earliest pending jobs that fit. A job is hours or (hours, gpus). order: "fifo" keeps the
    given order, "longest_first" sorts by GPU-time (hours x gpus), then hours, descending: a
    multi-GPU job goes first, before 1-GPU jobs fill the GPUs it would wait for."""
    jobs = [_job(j) for j in durations]
    if any(g > n_gpus for _, g in jobs):
        raise ValueError(f"a job needs more than n_gpus={n_gpus} GPUs")
    if order == "longest_first":
        jobs.sort(key=lambda j: (-j[0] * j[1], -j[0]))
    elif order != "fifo":
        raise ValueError(f"order={order!r} must be 'fifo' or 'longest_first'")
    now, free, running, pending, end = 0.0, n_gpus, [], list(jobs), 0.0
    while pending or running:
        i = 0
        while i < len(pending):
            d, g = pending[i]
            if g <= free:
                free -= g
                heapq.heappush(running, (now + d, g))
                end = max(end, now + d)
                pending.pop(i)
            else:
                i += 1
        if running:
            now, g = heapq.heappop(running)
            free += g
    return end


def order_longest_first(trials: Iterable[Any], cost: Callable[[PlanTrial], float] | None = None,
                        gpu: Gpu = L40S) -> list[Any]:
    """The trials (as given) sorted by estimated GPU-hours, then wall hours, largest first; ties
    keep their order. Trials that cannot fit (oom) cost 0 and go last."""
    def key(item: Any) -> tuple[float, float]:
        t = as_trial(item)
        try:
            hours = cost(t) if cost else estimate_gpu_hours(t, gpu)
        except InfeasibleTrial:
            return (0.0, 0.0)
        return (-hours, -hours / t.workers)
    return sorted(trials, key=key)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TrialPlan:
    key: str
    pattern: str
    frontend: str
    tokens: int
    act_gib_naive: float  # peak activations at the full per-worker batch
    act_gib_sdpa: float
    tflops_per_step: float
    gpu_hours: float  # 0 when oom: nothing will run
    feasibility: str
    micro_batch: int  # 0 when oom
    grad_accum_steps: int
    workers: int


def plan_trial(trial: Any, gpu_memory_gb: float = 48.0, safety: float = 0.8,
               gpu: Gpu = L40S) -> TrialPlan:
    t = as_trial(trial)
    gpu = replace(gpu, memory_gb=gpu_memory_gb)
    per_worker = t.batch_size // t.workers
    act = {impl: activation_memory_bytes(t.pattern, t.tokens, per_worker, impl, t.precision,
                                         t.frontend, t.d_model, t.d_state, t.expand,
                                         t.num_heads) / GIB for impl in ATTENTION_IMPLS}
    feas = feasibility(t, gpu_memory_gb, safety, gpu)
    micro, accum, hours = 0, 0, 0.0
    if feas != "oom":
        micro, accum = choose_micro_batch(t, gpu_memory_gb, safety, gpu=gpu)
        hours = estimate_gpu_hours(t, gpu, micro)
    return TrialPlan(t.key, t.pattern, t.frontend, t.tokens, act["naive"], act["sdpa"],
                     flops_per_step(t) / 1e12, hours, feas, micro, accum, t.workers)


def makespans(plans: Sequence[TrialPlan], gpus: int) -> dict[str, float]:
    """Wall hours for the runnable plans: FIFO, longest-first, and the lower bound."""
    jobs = [(p.gpu_hours / p.workers, p.workers) for p in plans if p.feasibility != "oom"]
    return {"fifo": simulate_makespan(jobs, gpus, "fifo"),
            "longest_first": simulate_makespan(jobs, gpus, "longest_first"),
            "lower_bound": lower_bound(jobs, gpus)}


def format_table(plans: Sequence[TrialPlan]) -> str:
    head = (f"{'trial':<42} {'pattern':<7} {'front':<5} {'tokens':>6} {'act naive':>10} "
            f"{'act sdpa':>9} {'TFLOP/step':>10} {'GPU-h':>7} {'feasible':>8} {'micro x acc':>11}")
    rows = [head, "-" * len(head)]
    for p in plans:
        mb = f"{p.micro_batch} x {p.grad_accum_steps}" if p.micro_batch else "-"
        rows.append(f"{p.key:<42} {p.pattern:<7} {p.frontend:<5} {p.tokens:>6} "
                    f"{p.act_gib_naive:>8.1f}Gi {p.act_gib_sdpa:>7.1f}Gi {p.tflops_per_step:>10.2f} "
                    f"{p.gpu_hours:>7.2f} {p.feasibility:>8} {mb:>11}")
    return "\n".join(rows)


def main(trials: Iterable[Any], gpus: int = 8, gpu_memory_gb: float = 48.0,
         attention_impl: str | None = None, safety: float = 0.8, gpu: Gpu = L40S,
         out: Callable[[str], Any] = print) -> list[TrialPlan]:
    """Print the per-trial table and the makespans; return the plans."""
    trials = [as_trial(t) for t in trials]
    if attention_impl is not None:
        trials = [replace(t, attention_impl=attention_impl) for t in trials]
    plans = [plan_trial(t, gpu_memory_gb, safety, gpu) for t in trials]
    out(format_table(plans))
    oom = [p.key for p in plans if p.feasibility == "oom"]
    total = sum(p.gpu_hours for p in plans)
    m = makespans(plans, gpus)
    out(f"\n{len(plans)} trials, {len(oom)} planned oom (not run), {total:.1f} GPU-hours "
        f"on {gpu_memory_gb:g} GB GPUs")
    out(f"makespan on {gpus} GPUs: FIFO {m['fifo']:.1f} h, longest-first {m['longest_first']:.1f} h, "
        f"lower bound {m['lower_bound']:.1f} h (longest-first / bound = "
        f"{m['longest_first'] / m['lower_bound']:.3f})" if m["lower_bound"] else "nothing to run")
    return plans


# ----------------------------------------------------------------------------- built-in study grid

# The SPEC's datasets, for when the grid (helix_sweep.sweep.grid) cannot be imported:
# (name, clip seconds, folds, epochs, classes, frontends, DDP workers); clips from DATASET_CLIPS.
STUDY_DATASETS = (
    ("esc50", 5.0, 5, 100, 50, ("raw", "mel"), 1),
    ("urbansound8k", 4.0, 10, 100, 10, ("raw", "mel"), 1),
    ("speechcommands", 1.0, 1, 100, 35, ("raw", "mel"), 1),
    ("speechcommands-concat", 10.0, 1, 24, 35, ("raw", "mel"), 1),
    ("librispeech", 30.0, 1, 100, 251, ("raw",), 1),
    ("voxpopuli", 300.0, 1, 100, 1_313, ("raw",), 4),
)
BACKBONES = (("mamba", "MMMMMM"), ("helix", "MMMAMM"), ("attention", "AAAAAA"))


def study_trials(attention_impl: str = "naive", precision: str = "fp16") -> list[PlanTrial]:
    """The six variants on every dataset of the SPEC (raw-only for the speaker-ID sets)."""
    out = []
    for name, seconds, folds, epochs, classes, frontends, workers in STUDY_DATASETS:
        samples = int(seconds * SAMPLE_RATE)
        train, evals = DATASET_CLIPS[name]
        for backbone, pattern in BACKBONES:
            for frontend in frontends:
                tokens = raw_tokens(samples) if frontend == "raw" else mel_tokens(samples)
                for fold in range(1, folds + 1):
                    key = f"{name}/{backbone}-{frontend}/" + (f"fold{fold}" if folds > 1 else "split")
                    out.append(PlanTrial(key, pattern, frontend, tokens, epochs, train, evals,
                                         num_classes=classes, attention_impl=attention_impl,
                                         precision=precision, workers=workers))
    return out


def _grid_trials(grid: str) -> list[PlanTrial]:
    """The lead's grid when it exists, else the built-in study table."""
    try:
        from helix_sweep.config import load_config  # type: ignore[attr-defined]
        from helix_sweep.sweep.grid import expand_grid  # type: ignore[attr-defined]
    except ImportError:
        return study_trials()
    return [as_trial(t) for t in expand_grid(load_config([f"grid={grid}"]))]


def _cli(argv: Sequence[str]) -> int:
    opts = {"grid": "full", "gpus": "8", "gpu_memory_gb": "48", "attention_impl": None}
    for arg in argv:
        k, sep, v = arg.partition("=")
        if not sep or k not in opts:
            raise SystemExit(f"plan: unknown argument {arg!r}; use key=value with keys {list(opts)}")
        opts[k] = v
    main(_grid_trials(opts["grid"]), int(opts["gpus"]), float(opts["gpu_memory_gb"]),
         opts["attention_impl"])
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
