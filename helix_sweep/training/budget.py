"""The cost model of a trial: memory, FLOPs, time on a GPU, micro-batch choice, feasibility.

One concept, the cost model (hence over 400 lines), in pure functions (no Ray, no MLflow), stated
once and used by the grid expansion (a trial's TrialBudget), the scheduler
(helix_sweep.sweep.schedule) and `python -m helix_sweep.plan`.
Its facts come from their homes: tokens per clip and patch sizes from helix_sweep.models.frontends,
parameter counts and the matched d_ffn from the model package, the pure scan's chunk and segment
lengths from helix_sweep.models.scan, clips per epoch from the dataset catalog
(search_spaces/datasets.yaml).

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

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from helix_sweep.config import TrialBudget, TrialSpec
from helix_sweep.models.classifier import classifier_params
from helix_sweep.models.frontends import SAMPLE_RATE, num_tokens, patch_inputs
from helix_sweep.models.matching import matched_d_ffn
from helix_sweep.models.scan_pure import chunk_len, segment_len

GIB = 1024**3
ATTENTION_IMPLS = ("naive", "sdpa")
PRECISIONS = ("fp16", "bf16", "fp32")
SCAN_IMPLS = ("fused", "reference")
FEASIBILITY = ("ok", "slow", "oom")
SLOW_FACTOR = 2.0  # the study's "slow": more than 2x pure Mamba's wall time on the same data


# ----------------------------------------------------------------------------- trial input


@dataclass(frozen=True)
class PlanTrial:
    """The cost model's view of one trial (`as_trial` makes one from a grid TrialSpec)."""

    key: str  # unique trial key, e.g. "esc50/helix-raw/fold1"
    pattern: str  # layer types, index 0 first: "M" BiMamba, "A" attention, e.g. "MMMAMM"
    frontend: str  # "raw" or "mel"
    tokens: int  # tokens per clip after the frontend
    epochs: int  # epochs trained (a truncated schedule counts only those run: train.stop_epoch)
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


def _from_spec(spec: TrialSpec) -> PlanTrial:
    model, train = spec.model, spec.train
    if spec.train_clips is None:
        raise ValueError(f"trial {spec.key!r}: no clips per epoch for dataset {spec.dataset!r}; set "
                         f"train_clips / eval_clips in search_spaces/datasets.yaml")
    # the budget's resolved precision once planned (trial_budget); before that auto counts as fp16
    precision = spec.budget.precision or ("fp16" if train.precision == "auto" else train.precision)
    return PlanTrial(spec.key, spec.pattern, spec.frontend, spec.tokens, train.stop_epoch, spec.train_clips,
                     spec.eval_clips or 0, train.batch_size, model.d_model, model.d_state, model.d_conv,
                     model.expand, model.num_heads, spec.num_classes, model.attention_impl, precision,
                     spec.resources.num_workers)


def as_trial(obj: Any) -> PlanTrial:
    """A checked PlanTrial from a PlanTrial, a grid TrialSpec, or a mapping with its field names."""
    if isinstance(obj, PlanTrial):
        trial = obj
    elif isinstance(obj, TrialSpec):
        trial = _from_spec(obj)
    elif isinstance(obj, dict):
        values = {f.name: obj[f.name] for f in fields(PlanTrial) if obj.get(f.name) is not None}
        missing = [n for n in ("key", "pattern", "frontend", "tokens", "epochs", "train_clips")
                   if n not in values]
        if missing:
            raise ValueError(f"trial {values.get('key', obj)!r}: missing fields {missing}")
        trial = PlanTrial(**values)
    else:
        raise TypeError(f"cannot plan {type(obj).__name__}: expected PlanTrial, TrialSpec or dict")
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


def tokens_per_clip(frontend: str, clip_seconds: float) -> int:
    """Tokens a clip of clip_seconds (at 16 kHz) becomes after the frontend."""
    return num_tokens(frontend, int(round(clip_seconds * SAMPLE_RATE)))


# ----------------------------------------------------------------------------- memory


def _dtype_bytes(precision: str) -> tuple[int, int]:
    """(bytes of matmul outputs / matmul inputs saved, bytes of fp32 tensors)."""
    return (4, 4) if precision == "fp32" else (2, 4)


def _reference_scan(tokens: int, batch: int, d_inner: int, d_state: int) -> tuple[int, int]:
    """(chunk, segment) of the pure-PyTorch scan's CPU loop for (batch, d_inner, d_state, tokens)."""
    chunk = chunk_len("loop", None, batch, d_inner, d_state, tokens)
    return chunk, segment_len(chunk, tokens)


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
            _, segment = _reference_scan(tokens, batch, E, N)
            states = math.ceil(tokens / segment)
            per_mixer = h * (7 * E + R + 4 * N) + f * E * N * states / tokens
        out += 2 * per_mixer
        out += (cast or f) * 2 * d  # [Yf ; Yb] saved by Wout
        return out
    if layer == "A":
        if d_ffn is None:
            d_ffn = matched_d_ffn(d_model, d_state, expand=expand)
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
    chunk, segment = _reference_scan(tokens, batch, E, N)
    return f * 18 * E + f * E * N * (4 * chunk + 1 + segment) / tokens


def frontend_saved_bytes_per_token(frontend: str, precision: str = "fp16",
                                   d_model: int = 256) -> float:
    """Frontend input patch (cast for the conv), conv output and the LayerNorm's input."""
    h, f = _dtype_bytes(precision)
    return h * patch_inputs(frontend) + (h + f) * d_model + f * d_model  # + final LN input of the head


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
    kw = dict(attention_impl=attention_impl, precision=precision, d_model=d_model, d_state=d_state,
              expand=expand, num_heads=num_heads, d_ffn=matched_d_ffn(d_model, d_state, expand=expand),
              scan_impl=scan_impl, batch=batch)
    saved = frontend_saved_bytes_per_token(frontend, precision, d_model)
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
    p = classifier_params(trial.pattern, trial.frontend, trial.num_classes, trial.d_model, trial.d_state,
                          trial.d_conv, trial.expand)
    return p * (16 + (0 if trial.precision == "fp32" else 2))


def training_memory_bytes(trial: Any, micro_batch: int, gpu: Gpu = L40S,
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
    d_ffn = matched_d_ffn(t.d_model, t.d_state, t.d_conv, t.expand)
    dense, quad, scan = 2.0 * patch_inputs(t.frontend) * t.d_model, 0.0, 0.0
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
    d_ffn = matched_d_ffn(t.d_model, t.d_state, expand=t.expand)
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


# ----------------------------------------------------------------------------- a grid trial's budget


def resolve_precision(trial: Any, requested: str, gpu_memory_gb: float = 48.0, safety: float = 0.8,
                      micro_batch: int | None = None, gpu: Gpu = L40S) -> str:
    """train.precision for a GPU trial: an explicit one as is; "auto" is fp32 where the trial fits one GPU
    in fp32 (its whole per-worker batch, or the micro_batch the user set) and fp16 mixed precision only
    where memory needs it (the protocol's "FP16 mixed precision where memory needs it")."""
    if requested != "auto":
        return requested
    t = replace(as_trial(trial), precision="fp32")
    per_worker = t.batch_size // t.workers
    clips = min(micro_batch or per_worker, per_worker)
    fits = training_memory_bytes(t, clips, gpu) <= safety * gpu_memory_gb * GIB
    return "fp32" if fits else "fp16"


def trial_budget(spec: TrialSpec, rule_reason: str = "") -> TrialBudget:
    """Precision, feasibility, micro-batch and accumulation of a grid trial on one GPU of
    resources.gpu_memory_gb, under the trial's own attention_impl (and, for the record, under each
    implementation), and why it is kept out: the plan predicts OOM (one clip does not fit), or a grid's
    ruled_oom rule names it (`rule_reason`), although the plan says it fits."""
    gb = spec.resources.gpu_memory_gb
    per_worker = spec.train.batch_size // spec.resources.num_workers
    by_impl, planned = {}, {}
    for impl in ATTENTION_IMPLS:
        t = replace(as_trial(spec), attention_impl=impl)
        t = replace(t, precision=resolve_precision(t, spec.train.precision, gb, micro_batch=spec.train.micro_batch))
        planned[impl], by_impl[impl] = t, feasibility(t, gb)
    t = planned[spec.model.attention_impl]
    try:
        micro, accum = choose_micro_batch(t, gb)
        reason = ""
    except InfeasibleTrial as exc:  # forced trials run at the smallest micro-batch (and end as oom)
        micro, accum = 1, per_worker
        reason = f"plan: {exc}"
    if spec.train.micro_batch:  # one the user set is kept
        micro = min(spec.train.micro_batch, per_worker)
        accum = per_worker // micro
    by = "plan" if reason else ("rule" if rule_reason else "")
    reason = reason or (f"grid rule: {rule_reason}" if rule_reason else "")
    return TrialBudget(feasibility=by_impl[spec.model.attention_impl], feasibility_by_impl=by_impl,
                       precision=t.precision, micro_batch=micro, grad_accum=accum, planned_oom=by, oom_reason=reason)


@dataclass(frozen=True)
class TrialPlan:
    """The plan's figures for one trial (the rows of `python -m helix_sweep.plan`)."""

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
