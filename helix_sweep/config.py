"""Typed configuration: YAML in search_spaces/ plus `key=value` overrides, checked before anything runs.

Composition, later wins: search_spaces/base.yaml < search_spaces/grids/<grid>.yaml < command line.
The catalogs search_spaces/variants.yaml and datasets.yaml are loaded into the same tree
(`variant_defs`, `dataset_defs`) so that they, too, can be overridden and are type-checked.
Imports nothing from the rest of the package. One concept (the typed settings, their composition and
their checks), hence one module of over 400 lines.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


class ConfigError(ValueError):
    """A bad grid name, key or value; the message names it and lists what is valid."""


@dataclass
class ModelConfig:
    d_model: int = 256  # token width D
    d_state: int = 32  # SSM state size N per channel
    d_conv: int = 4  # causal depthwise conv width in each Mamba mixer
    expand: int = 2  # d_inner = expand * d_model
    num_heads: int = 4  # attention heads
    attention_impl: str = "sdpa"  # sdpa | naive (materialises L x L weights, as the study did)
    pos_encoding: str = "none"  # none (the paper's) | sinusoidal (an ablation, grid=positions; see README)
    # selective scan: auto (mamba_ssm's CUDA kernels when a probe shows they run, else Triton on
    # CUDA, else pure PyTorch) | cuda | triton | pure; an explicit one that cannot run fails at build
    scan_impl: str = "auto"


@dataclass
class AugmentSettings:
    """The training split's augmentation (helix_sweep.data.augment applies it); each step can be off."""

    shift: bool = True  # circular time shift within +-time_shift_s
    time_shift_s: float = 0.5
    gain: bool = True  # gain drawn from [gain_min, gain_max]
    gain_min: float = 0.8
    gain_max: float = 1.2
    noise: bool = True  # additive Gaussian noise
    noise_std: float = 0.005
    mixup: bool = True  # mix each clip with a random partner, weight ~ Beta(mixup_alpha, mixup_alpha)
    mixup_alpha: float = 0.3


INJECT_KEYS = ("nan_at_step", "nan_from_step", "oom_at_step", "kill_at_step", "kill_marker", "sleep_per_step",
               "sleep_before_finish", "oom_marker", "trial", "per_trial", "rank")


@dataclass
class TrainConfig:
    epochs: int = 100  # length of the cosine schedule (the protocol's 100)
    # stop after this many epochs of that schedule (None: run all `epochs`); the paper's Concat Speech
    # Commands runs stopped at epoch 24 of a 100-epoch schedule, the LR still near its peak
    stop_after_epochs: Optional[int] = None
    batch_size: int = 32  # effective batch (the protocol's 32)
    micro_batch: Optional[int] = None  # per-step batch; batch_size / micro_batch accumulation steps
    lr: float = 3e-4
    min_lr: float = 1e-6  # cosine annealing floor
    weight_decay: float = 0.05  # not on A_log, D, biases, norms
    grad_clip: float = 1.0
    # auto: on a GPU fp32 where the trial's plan fits one GPU in fp32 (whole batch, no accumulation),
    # fp16 mixed precision only where memory needs it (the protocol's); fp32 on CPU. fp16 | bf16: mixed
    # precision always (e.g. for speed); fp32: never
    precision: str = "auto"
    seed: int = 0
    checkpoint_minutes: float = 15.0  # mid-epoch checkpoint interval (0: after every step)
    keep_checkpoints: int = 2  # newest kept, plus the best
    max_nonfinite_steps: int = 25  # consecutive skipped steps before "diverged"
    deterministic: bool = False  # torch.use_deterministic_algorithms
    val_fraction: float = 0.0  # held-out share of the training side as validation
    log_model: bool = False  # log the best weights to MLflow
    # test hooks (fault injection), INJECT_KEYS: nan_at_step, nan_from_step, oom_at_step, kill_at_step +
    # kill_marker, sleep_per_step, sleep_before_finish; trial, per_trial, rank (one DDP rank only)
    # (helix_sweep.training.faults says what each does)
    inject: Dict[str, Any] = field(default_factory=dict)
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    @property
    def stop_epoch(self) -> int:
        """The epoch after which training stops: stop_after_epochs, else the whole schedule."""
        return self.epochs if self.stop_after_epochs is None else self.stop_after_epochs


@dataclass
class ResourceConfig:
    num_workers: int = 1  # Ray Train workers (DDP) per trial
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    # GPUs per worker: "auto" (the planner packs a short trial onto 1/2, 1/4 or 1/8 of a GPU from its
    # peak memory and GPU utilisation; helix_sweep.training.packing) or a number: in (0, 1] (a share
    # of one GPU) or a whole number >= 1. Only on GPU clusters (resources.use_gpu).
    gpus_per_worker: str = "auto"
    gpu_memory_gb: float = 48.0  # memory of one GPU: the planner's feasibility and micro-batch target
    # CPUs a GPU node has per GPU (cluster.yaml: g6e.xlarge, 4 vCPUs per L40S): packing puts at most
    # cpus_per_gpu / cpus_per_worker trials on one GPU, as many as Ray can place beside it
    cpus_per_gpu: float = 4.0
    # auto: a trial of one CPU worker on the driver's own local Ray (a grid) trains in Tune's trial
    # actor, without a Ray Train run (helix_sweep.sweep.trainable.in_actor); train: always a Train run
    trial_runner: str = "auto"


@dataclass
class VariantDef:
    pattern: str = MISSING  # layer pattern, M = BiMamba, A = attention, index 0 first
    frontend: str = MISSING  # raw | mel


@dataclass
class DatasetDef:
    title: str = ""  # the name tables and figures show ("": the key)
    clip_seconds: float = MISSING
    num_classes: int = MISSING
    folds: Optional[List[int]] = None  # None: one official split
    synthetic: bool = False
    # what the head pools: all (every token) | first_clip (the tokens of the first of options.concat_n
    # joined clips, on each frontend: helix_sweep.models.frontends.first_clip_tokens)
    pool: str = "all"
    pool_tokens: Optional[int] = None  # an explicit K on every frontend, overriding `pool`
    frontends: List[str] = field(default_factory=lambda: ["raw", "mel"])
    options: Dict[str, Any] = field(default_factory=dict)  # task options for data.open_task
    # source subsets (options.subset picks one) -> the figures that differ between them: num_classes,
    # train_clips, eval_clips (e.g. LibriSpeech train-clean-100: 251 speakers, train-clean-360: 921)
    subsets: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    train: Dict[str, Any] = field(default_factory=dict)  # per-dataset train overrides
    model: Dict[str, Any] = field(default_factory=dict)  # per-dataset model overrides (e.g. attention_impl)
    resources: Dict[str, Any] = field(default_factory=dict)  # per-dataset resource overrides
    # clips per epoch for the cost model (helix_sweep.training.budget): trained, and evaluated after
    # every epoch; the task gives the exact counts at run time
    train_clips: Optional[int] = None
    eval_clips: Optional[int] = None


@dataclass
class SearchConfig:
    """An Optuna search through Ray Tune (grid=tune); num_samples 0 means a plain grid."""

    num_samples: int = 0
    metric: str = "best_test_acc"
    mode: str = "max"
    seed: int = 0
    max_concurrent: int = 2
    asha: bool = True  # ASHA early stopping on `metric` per epoch
    grace_period: int = 1
    reduction_factor: int = 2
    space: Dict[str, Any] = field(default_factory=dict)  # dotted train key -> {type, low, high | values}


@dataclass
class PlanConfig:
    """The planner's measured figures (helix_sweep.training.packing): a calibration file written on a
    GPU by benchmarks/packing.py; trials it does not cover use the cost model (modelled)."""

    gpu: str = "NVIDIA L40S"  # the cluster's GPU model, as torch names it (cluster.yaml: g6e.xlarge)
    # auto: benchmarks/calibration/<gpu, lower case, spaces as '-'>.json when it exists | a file | none
    calibration: str = "auto"
    headroom: float = 1.5  # a packed trial's share of the GPU memory holds its peak x headroom


@dataclass
class SweepConfig:
    grid: str = "smoke"
    experiment: Optional[str] = None  # None -> helix-<grid>
    description: str = ""
    variants: List[str] = field(default_factory=list)
    datasets: List[str] = field(default_factory=list)
    folds: Optional[List[int]] = None  # narrow folded datasets to these test folds
    # placement / ratio grids generate their patterns instead of naming variants:
    attention_positions: Optional[List[int]] = None  # one A at each of these indices
    attention_counts: Optional[List[int]] = None  # k A layers spread evenly
    frontends: List[str] = field(default_factory=lambda: ["raw", "mel"])  # for generated patterns
    # documented exceptions, each a dict of trial fields that must all match, e.g. {dataset: x, variant: y}
    exclude: List[Dict[str, Any]] = field(default_factory=list)
    # trials a grid keeps out although the plan may say they fit: each rule is trial fields plus a
    # `reason:` (required); its trials are recorded with status ruled_oom and "grid rule: <reason>"
    ruled_oom: List[Dict[str, Any]] = field(default_factory=list)
    workdir: str = "./helix_work"
    data_root: Optional[str] = None
    tracking_uri: Optional[str] = None
    # seconds a trial's end waits for an unreachable tracking server before its worker leaves the
    # final status in a file for the driver, the next run or the report (and frees its GPU)
    tracking_wait_s: float = 30.0
    ray_address: Optional[str] = None
    dry_run: bool = False
    resume: Optional[str] = None
    max_concurrent_trials: Optional[int] = None
    max_failures: int = 3
    force_infeasible: bool = False  # run planned_oom and ruled_oom trials instead of recording them
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    variant_defs: Dict[str, VariantDef] = field(default_factory=dict)
    dataset_defs: Dict[str, DatasetDef] = field(default_factory=dict)
    # train / model keys set on the command line: they win over a dataset's own overrides, which win
    # over the grid file's and base.yaml's settings
    train_explicit: Dict[str, Any] = field(default_factory=dict)
    model_explicit: Dict[str, Any] = field(default_factory=dict)

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"helix-{self.grid}"

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    @property
    def data_root_path(self) -> Path:
        return Path(self.data_root).expanduser().resolve() if self.data_root else self.workdir_path / "data"


CHOICES = {
    "model.attention_impl": ("sdpa", "naive"),
    "model.pos_encoding": ("sinusoidal", "none"),
    "model.scan_impl": ("auto", "cuda", "triton", "pure"),
    "train.precision": ("auto", "fp32", "fp16", "bf16"),
    "resources.use_gpu": ("auto", "true", "false"),
    "resources.trial_runner": ("auto", "train"),
    "search.mode": ("max", "min"),
}


def available_grids() -> list[str]:
    return sorted(p.stem for p in (SEARCH_SPACES / "grids").glob("*.yaml"))


def grid_file(name: str) -> dict:
    """A grid's own settings, without its `extends:` key."""
    data = _read_yaml(SEARCH_SPACES / "grids" / f"{name}.yaml")
    data.pop("extends", None)
    return data


def grid_chain(grid: str) -> list[str]:
    """The grid and the grids it extends (`extends: NAME` at its top), base-most first."""
    chain = [grid]
    while (parent := _read_yaml(SEARCH_SPACES / "grids" / f"{chain[0]}.yaml").get("extends")) is not None:
        if parent not in available_grids():
            raise ConfigError(f"search_spaces/grids/{chain[0]}.yaml: extends unknown grid {parent!r}; "
                              f"available grids: {', '.join(available_grids())}")
        if parent in chain:
            raise ConfigError(f"search_spaces/grids: grids extend each other in a loop: {' -> '.join([parent, *chain])}")
        chain.insert(0, parent)
    return chain


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _valid_keys(dc: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, for error messages."""
    out = []
    for f in fields(dc):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out += _valid_keys(default, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    valid = [k for k in _valid_keys(SweepConfig) if k not in ("variant_defs", "dataset_defs")]
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in valid if k.startswith(parent) and "." not in k[len(parent):]] if parent else \
        [k for k in valid if "." not in k]
    hint = difflib.get_close_matches(key, valid, n=1)
    text = f"{source}: bad config key or value {key!r}: {msg}."
    if hint and hint[0] != key:
        text += f" Did you mean {hint[0]!r}?"
    text += f" Valid keys here: {', '.join(siblings or valid)}"
    return ConfigError(text)


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from None


def parse_overrides(args: list[str]) -> DictConfig:
    out = OmegaConf.create()
    for arg in args:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"argument {arg!r}: expected key=value (e.g. grid=smoke, train.epochs=3)")
        try:  # one argument at a time, so the error names the one at fault
            out = OmegaConf.merge(out, OmegaConf.from_dotlist([arg]))
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"argument {arg!r}: cannot parse the value ({first}); lists look like "
                              f"key=[a,b], strings with commas or brackets need quotes") from None
    return out


def load_config(overrides: list[str] | None = None) -> SweepConfig:
    """Compose base + grid + catalogs + overrides into a checked SweepConfig."""
    cli = parse_overrides(overrides or [])
    grid = cli.get("grid", "smoke")
    grids = available_grids()
    if grid not in grids:
        raise ConfigError(f"unknown grid {grid!r}; available grids: {', '.join(grids)}")
    cfg = OmegaConf.structured(SweepConfig)
    cfg = _merge(cfg, {"variant_defs": _read_yaml(SEARCH_SPACES / "variants.yaml"),
                       "dataset_defs": _read_yaml(SEARCH_SPACES / "datasets.yaml")}, "search_spaces catalogs")
    cfg = _merge(cfg, _read_yaml(SEARCH_SPACES / "base.yaml"), "search_spaces/base.yaml")
    for name in grid_chain(grid):
        cfg = _merge(cfg, grid_file(name), f"search_spaces/grids/{name}.yaml")
    cfg = _merge(cfg, cli, "command line")
    for section in ("train", "model"):  # the command line beats a dataset's own overrides
        cfg[f"{section}_explicit"] = OmegaConf.to_container(cli).get(section) or {}
    try:
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "config") from None
    sweep: SweepConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    check_config(sweep)
    return sweep


@lru_cache(maxsize=None)
def dataset_catalog() -> Dict[str, DatasetDef]:
    """search_spaces/datasets.yaml, type-checked: every dataset a grid can name, as written there
    (without a command line's dataset_defs overrides). Read-only: shared between callers."""
    node = _merge(OmegaConf.structured(SweepConfig), {"dataset_defs": _read_yaml(SEARCH_SPACES / "datasets.yaml")},
                  "search_spaces/datasets.yaml")
    return OmegaConf.to_object(node.dataset_defs)  # type: ignore[return-value]


@lru_cache(maxsize=None)
def variant_catalog() -> Dict[str, VariantDef]:
    """search_spaces/variants.yaml, type-checked: the study's named variants, in the study's order."""
    node = _merge(OmegaConf.structured(SweepConfig), {"variant_defs": _read_yaml(SEARCH_SPACES / "variants.yaml")},
                  "search_spaces/variants.yaml")
    return OmegaConf.to_object(node.variant_defs)  # type: ignore[return-value]


def check_config(cfg: SweepConfig) -> None:
    """Value checks that types alone do not catch; each names the key and the valid values."""
    values = {"model.attention_impl": cfg.model.attention_impl, "model.pos_encoding": cfg.model.pos_encoding,
              "model.scan_impl": cfg.model.scan_impl, "train.precision": cfg.train.precision,
              "resources.use_gpu": str(cfg.resources.use_gpu).lower(),
              "resources.trial_runner": cfg.resources.trial_runner, "search.mode": cfg.search.mode}
    for key, value in values.items():
        if value not in CHOICES[key]:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(CHOICES[key])}")
    for name in cfg.variants:
        if name not in cfg.variant_defs:
            raise ConfigError(f"variants: unknown variant {name!r}; valid: {', '.join(cfg.variant_defs)}")
    for name in cfg.datasets:
        if name not in cfg.dataset_defs:
            raise ConfigError(f"datasets: unknown dataset {name!r}; valid: {', '.join(cfg.dataset_defs)}")
    for name, v in cfg.variant_defs.items():
        if not v.pattern or set(v.pattern) - {"M", "A"}:
            raise ConfigError(f"variant_defs.{name}.pattern={v.pattern!r}: use only M and A")
        if v.frontend not in ("raw", "mel"):
            raise ConfigError(f"variant_defs.{name}.frontend={v.frontend!r}: expected raw or mel")
    for name, d in cfg.dataset_defs.items():
        check_dataset(d, f"dataset_defs.{name}")
    for i, rule in enumerate(cfg.ruled_oom):
        if not str(rule.get("reason") or "").strip():
            raise ConfigError(f"ruled_oom[{i}]={rule}: a rule that keeps trials out must say why (reason: ...); "
                              f"the plan alone decides otherwise")
    for f in cfg.frontends:
        if f not in ("raw", "mel"):
            raise ConfigError(f"frontends: {f!r} is not a frontend; expected raw or mel")
    if cfg.folds is not None:
        folded = [d for d in cfg.datasets if cfg.dataset_defs[d].folds]
        valid = sorted({k for d in folded for k in cfg.dataset_defs[d].folds or []})
        bad = [k for k in cfg.folds if k not in valid]
        if bad and folded:  # folds narrow folded datasets only; single-split ones ignore them
            raise ConfigError(f"folds: {bad} not valid for datasets {folded}; valid folds: {valid}")
    if cfg.experiment is not None and not PLAIN_NAME.fullmatch(cfg.experiment):
        raise ConfigError(f"experiment={cfg.experiment!r}: must be a plain name (letters, digits, '.', '_', '-', "
                          f"not starting with '.'): it names a folder under <workdir>/experiments")
    if cfg.folds is not None and not cfg.folds:
        raise ConfigError("folds=[]: names no fold, which would silently drop every folded dataset; "
                          "omit folds= to run every fold, or name some, e.g. folds=[1,2]")
    check_ranges(cfg)
    check_model(cfg.model, "model")
    check_train(cfg.train, "train")
    check_resources(cfg.resources, "resources")
    workers = max([cfg.resources.num_workers,
                   *(int(cfg.dataset_defs[d].resources.get("num_workers", 0)) for d in cfg.datasets)])
    inject = cfg.train.inject
    for section in [inject, *(inject.get("per_trial") or {}).values()]:
        if section.get("rank", 0) >= workers:  # a fault for a rank no trial has would never fire
            raise ConfigError(f"train.inject: rank {section['rank']} is not a rank of any trial "
                              f"(resources.num_workers={workers}; ranks count from 0)")


PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # no path separators, no leading '.', so no '..'

# Lower bounds of numeric settings: (bound, inclusive). Ray reads max_failures=-1 as "retry forever",
# and a negative lr or interval trains or checkpoints nonsense without failing, so each is checked here.
RANGES = {
    "max_failures": (0, True), "tracking_wait_s": (0, True),
    "search.num_samples": (0, True), "search.max_concurrent": (1, True), "search.grace_period": (1, True),
    "search.reduction_factor": (2, True),
    "model.d_model": (1, True), "model.d_state": (1, True), "model.d_conv": (1, True), "model.expand": (1, True),
    "model.num_heads": (1, True),
    "train.epochs": (1, True), "train.stop_after_epochs": (1, True), "train.batch_size": (1, True),
    "train.lr": (0, False), "train.min_lr": (0, True),
    "train.weight_decay": (0, True), "train.grad_clip": (0, False), "train.checkpoint_minutes": (0, True),
    "train.keep_checkpoints": (1, True), "train.max_nonfinite_steps": (1, True),
    "train.augment.time_shift_s": (0, True), "train.augment.gain_min": (0, True),
    "train.augment.noise_std": (0, True), "train.augment.mixup_alpha": (0, True),
    "resources.num_workers": (1, True), "resources.cpus_per_worker": (0, False),
    "resources.gpu_memory_gb": (0, False), "resources.cpus_per_gpu": (0, False), "plan.headroom": (1, True),
}


def _check_bounds(obj: Any, section: str, where: str) -> None:
    """The RANGES keys of `section` ("train", "model", ..., "" for the top level and search) on `obj`;
    an error names the key as `where`.<rest>."""
    for key, (low, inclusive) in RANGES.items():
        head, _, rest = key.partition(".")
        if (head if rest else "") != section:
            continue
        value = obj
        for part in (rest or key).split("."):
            value = getattr(value, part)
        if value is None:  # an optional setting left unset
            continue
        if value < low or (value == low and not inclusive):
            name = f"{where}.{rest}" if where else key
            raise ConfigError(f"{name}={value}: must be {'>=' if inclusive else '>'} {low}")


def check_ranges(cfg: SweepConfig) -> None:
    _check_bounds(cfg, "", "")
    _check_bounds(cfg.search, "search", "search")
    _check_bounds(cfg.plan, "plan", "plan")


def check_model(m: ModelConfig, where: str) -> None:
    """Model values that would otherwise fail inside every worker."""
    _check_bounds(m, "model", where)
    if m.d_model % m.num_heads:
        raise ConfigError(f"{where}.num_heads={m.num_heads}: must divide {where}.d_model={m.d_model} "
                          f"(each head gets d_model / num_heads channels)")


def check_train(t: TrainConfig, where: str) -> None:
    _check_bounds(t, "train", where)
    check_inject(t.inject, f"{where}.inject")
    if t.micro_batch is not None and (t.micro_batch < 1 or t.batch_size % t.micro_batch):
        raise ConfigError(f"{where}.micro_batch={t.micro_batch}: must divide {where}.batch_size={t.batch_size}")
    if not 0.0 <= t.val_fraction < 1.0:
        raise ConfigError(f"{where}.val_fraction={t.val_fraction}: must be in [0, 1)")
    if t.stop_after_epochs is not None and t.stop_after_epochs > t.epochs:
        raise ConfigError(f"{where}.stop_after_epochs={t.stop_after_epochs}: must not exceed {where}.epochs={t.epochs} "
                          f"(the schedule's length; training stops after stop_after_epochs of it)")
    if t.min_lr > t.lr:
        raise ConfigError(f"{where}.min_lr={t.min_lr}: must not exceed {where}.lr={t.lr}")
    a = t.augment
    if a.gain_min > a.gain_max:
        raise ConfigError(f"{where}.augment.gain_min={a.gain_min} > {where}.augment.gain_max={a.gain_max}: "
                          f"the gain is drawn from [gain_min, gain_max]")


def check_inject(inject: dict, where: str) -> None:
    """Fault-injection keys (INJECT_KEYS), also inside per_trial; rank a non-negative integer."""
    sections = [(where, inject)] + [(f"{where}.per_trial.{part}", faults)
                                    for part, faults in (inject.get("per_trial") or {}).items()]
    for name, section in sections:
        if not isinstance(section, dict):
            raise ConfigError(f"{name}={section!r}: expected a mapping of fault keys")
        unknown = sorted(set(section) - set(INJECT_KEYS))
        if unknown:
            raise ConfigError(f"{name}: unknown key(s) {unknown}; valid: {', '.join(INJECT_KEYS)}")
        rank = section.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ConfigError(f"{name}.rank={rank!r}: expected a DDP rank, an integer >= 0")


POOLS = ("all", "first_clip")


def check_dataset(d: DatasetDef, where: str) -> None:
    """A catalog entry's pooling and subsets (the rest is typed)."""
    if d.pool not in POOLS:
        raise ConfigError(f"{where}.pool={d.pool!r}: expected one of {', '.join(POOLS)}")
    if d.pool == "first_clip" and int(d.options.get("concat_n", 0)) < 1:
        raise ConfigError(f"{where}.pool=first_clip needs {where}.options.concat_n >= 1 (clips joined per example)")
    if d.pool_tokens is not None and d.pool_tokens < 1:
        raise ConfigError(f"{where}.pool_tokens={d.pool_tokens}: must be >= 1 (or null)")
    subset = d.options.get("subset")
    if d.subsets and subset not in d.subsets:
        raise ConfigError(f"{where}.options.subset={subset!r}: expected one of {', '.join(d.subsets)}")
    for name, figures in d.subsets.items():
        unknown = set(figures) - {"num_classes", "train_clips", "eval_clips"}
        if unknown:
            raise ConfigError(f"{where}.subsets.{name}: unknown key(s) {sorted(unknown)}; "
                              f"valid: num_classes, train_clips, eval_clips")


def check_resources(r: ResourceConfig, where: str) -> None:
    _check_bounds(r, "resources", where)
    gpus_per_worker(r, where)


def gpus_per_worker(r: ResourceConfig, where: str = "resources") -> Optional[float]:
    """resources.gpus_per_worker as a number, or None for "auto" (the planner's share)."""
    value = str(r.gpus_per_worker).strip().lower()
    if value == "auto":
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (0 < number <= 1 or (number >= 1 and number.is_integer())):
        raise ConfigError(f"{where}.gpus_per_worker={r.gpus_per_worker}: expected auto, a share of one GPU "
                          f"in (0, 1], or a whole number of GPUs >= 1")
    return number


def to_dict(cfg: Any) -> dict:
    """A plain, JSON/YAML-able dict of a config dataclass."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))



@dataclass
class TrialBudget:
    """What the cost model (helix_sweep.training.budget) decides for a trial, once, when the grid is
    expanded; the trial table, the driver and the training loop read it."""

    feasibility: str = "ok"  # ok | slow | oom on one GPU of resources.gpu_memory_gb (the study's Table 1),
    #                          under the trial's own model.attention_impl
    # the same verdict under each attention implementation ({"naive": ..., "sdpa": ...}): what the
    # paper's naive attention would give, and what SDPA changes
    feasibility_by_impl: Dict[str, str] = field(default_factory=dict)
    # train.precision resolved for a GPU: fp32 where the trial fits in fp32, else fp16 (auto), or the one
    # set; "" when not planned. On CPU trials run fp32 whatever it says
    precision: str = ""
    # clips per micro-step per worker on that GPU: train.micro_batch if set, else the largest that
    # fits; 1 when nothing fits (a forced infeasible trial). 0: not planned (a spec built by hand)
    micro_batch: int = 0
    grad_accum: int = 0  # micro-steps per optimizer step: micro_batch * grad_accum * workers = batch_size
    planned_oom: str = ""  # who keeps it out: "plan" (one clip does not fit: status planned_oom), "rule"
    #                        (a grid's ruled_oom rule, the plan says it fits: status ruled_oom) or "";
    #                        with force_infeasible the trial runs anyway
    oom_reason: str = ""  # why, in words (the MLflow stop_reason of a planned_oom / ruled_oom trial)
    # GPUs each worker asks Ray for on a GPU cluster: resources.gpus_per_worker if a number, else the
    # planner's share (1, 1/2, 1/4, 1/8; helix_sweep.training.packing.gpu_fraction)
    gpu_fraction: float = 1.0


@dataclass
class TrialSpec:
    """One trial of a sweep: everything its Ray Train workers need, as plain typed data."""

    key: str = MISSING  # <dataset>/<variant>/fold<k>, or <dataset>/<variant>/split
    experiment: str = MISSING
    dataset: str = MISSING
    variant: str = MISSING
    pattern: str = MISSING
    frontend: str = MISSING
    fold: Optional[int] = None
    clip_seconds: float = MISSING
    num_classes: int = MISSING
    tokens: int = MISSING  # tokens per clip for this frontend
    pool_tokens: Optional[int] = None  # the head pools the first K tokens (None: all)
    synthetic: bool = False
    train_clips: Optional[int] = None  # clips per epoch from the catalog, for the cost model
    eval_clips: Optional[int] = None
    status: str = "run"  # run | planned_oom (the plan predicts OOM) | ruled_oom (a grid rule keeps it out)
    data_root: str = MISSING
    task_options: Dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    budget: TrialBudget = field(default_factory=TrialBudget)

    @property
    def fold_label(self) -> str:
        return "split" if self.fold is None else str(self.fold)

