"""Optuna searches through Ray Tune (grid=tune): the space as data, TPE seeded, ASHA on epochs.

A search runs over one base trial (one dataset, variant and fold); each sample overrides dotted
`train.*` keys of it. The sample's trial key is the base key plus a digest of the sampled values, so
its Ray Train run, checkpoints and MLflow run are its own and a restored search finds them again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from ray import tune

from helix_sweep.config import ConfigError, SearchConfig, TrialSpec

DISTRIBUTIONS = {
    "loguniform": lambda d: tune.loguniform(float(d["low"]), float(d["high"])),
    "uniform": lambda d: tune.uniform(float(d["low"]), float(d["high"])),
    "randint": lambda d: tune.randint(int(d["low"]), int(d["high"])),
    "choice": lambda d: tune.choice(list(d["values"])),
}
SEARCHABLE = ("train.",)
SAMPLE_MARK = "/s"  # a sample's trial key: its base trial's key, this, a digest of its sampled values


def search_space(search: SearchConfig) -> dict:
    """{"train.lr": {type: loguniform, low, high}, ...} -> Tune sample domains."""
    space = {}
    for key, dist in search.space.items():
        if not key.startswith(SEARCHABLE):
            raise ConfigError(f"search.space.{key}: only train.* keys can be searched")
        kind = dist.get("type")
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"search.space.{key}.type={kind!r}: expected one of {', '.join(DISTRIBUTIONS)}")
        space[key] = DISTRIBUTIONS[kind](dist)
    if not space:
        raise ConfigError("search.num_samples > 0 but search.space is empty")
    return space


def sampled(config: dict) -> dict:
    return {k: v for k, v in config.items() if k.startswith(SEARCHABLE)}


def sample_key(base_key: str, config: dict) -> str:
    """The trial key of a Tune config: the base key, plus a digest of its sampled values if any."""
    values = sampled(config)
    if not values:
        return base_key
    digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{base_key}{SAMPLE_MARK}{digest}"


def runs_of(base_key: str, keyed: dict) -> list:
    """The values of `keyed` (trial key -> run) that are the trial `base_key`'s: its own, or in a
    search its samples' (sample_key)."""
    return [r for key, r in keyed.items() if key == base_key or key.startswith(base_key + SAMPLE_MARK)]


def apply_sample(trial: TrialSpec, config: dict) -> TrialSpec:
    """The base trial with the sampled train.* values set (type-checked) and a key of its own."""
    values = sampled(config)
    if not values:
        return trial
    node = OmegaConf.structured(trial)
    for dotted, value in values.items():
        try:
            OmegaConf.update(node, dotted, value, merge=False)
        except OmegaConfBaseException as exc:
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"search.space: {dotted}={value!r} is not a valid config value: {reason}") from None
    out: TrialSpec = OmegaConf.to_object(node)  # type: ignore[assignment]
    return replace(out, key=sample_key(trial.key, config))


def searcher_and_scheduler(search: SearchConfig, epochs: int):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = ConcurrencyLimiter(OptunaSearch(metric=search.metric, mode=search.mode, seed=search.seed),
                                  max_concurrent=search.max_concurrent)
    scheduler = None
    if search.asha:
        scheduler = ASHAScheduler(time_attr="epoch", metric=search.metric, mode=search.mode, max_t=epochs,
                                  grace_period=search.grace_period, reduction_factor=search.reduction_factor)
    return searcher, scheduler
