"""The Ray Train worker of a trial: run_training with a reporter that checkpoints through Ray Train
and logs to the trial's single MLflow run from rank 0.

Order per epoch: write the checkpoint (atomically, into a temp dir) -> ray.train.report, which
persists it to the run's storage -> only then log the epoch's metrics. A kill between the two
loses no metrics: the checkpoint's history holds them and the next start logs what is missing.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import ray.train
import torch

from helix_sweep.config import TrialSpec, to_yaml, trial_from_dict
from helix_sweep.training.checkpoint import Progress, load_state, save_state
from helix_sweep.training.loop import run_training

log = logging.getLogger(__name__)


class RayMlflowReporter:
    def __init__(self, spec: TrialSpec, tracking: dict):
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.spec, self.tracking = spec, tracking
        self.run = None
        self.resumed = False
        self.best_model: Optional[dict] = None
        self.label_names: list[str] = []
        self.closed = False
        self.reported = False  # whether this worker start reported anything to Tune yet
        self.stop_reason = ""

    def load(self) -> Optional[dict]:
        """The newest checkpoint: Ray's latest, or a newer one of ours in the run's storage directory.

        Ray registers a checkpoint in its snapshot after the upload; a controller lost with its node
        in between (seen with ray.cluster_utils.Cluster.remove_node) leaves the snapshot one behind
        or empty, so the run directory is scanned too (local or mounted shared storage)."""
        state = None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = load_state(Path(d))
        newer = latest_on_disk(self.tracking.get("run_dir", ""))
        if newer is not None and (state is None or _step(newer) > state["progress"]["global_step"]):
            log.warning("%s: resuming from %s, newer than Ray's latest registered checkpoint", self.spec.key, newer)
            state = load_state(newer)
        self.resumed = state is not None
        return state

    def start(self, progress: Progress, info: dict) -> str:
        if self.rank != 0:
            return progress.run_id
        from helix_sweep.sweep.trial_run import TrialRun, code_version, package_versions

        s = self.spec
        self.run = TrialRun(self.tracking["uri"], s.experiment, s.key)
        params = {  # the train settings first: the resolved micro_batch / grad_accum below win
            **{k: v for k, v in _flat(s.train.__dict__).items() if k != "inject"},
            "variant": s.variant, "frontend": s.frontend, "pattern": s.pattern,
            "attention_positions": [i for i, c in enumerate(s.pattern) if c == "A"], "dataset": s.dataset,
            "fold": s.fold_label, "n_params": info["n_params"], "n_params_per_layer": info["n_params_per_layer"],
            "d_model": s.model.d_model, "d_state": s.model.d_state, "d_ffn": info["d_ffn"],
            "tokens_per_clip": info["tokens_per_clip"], "pool_tokens": s.pool_tokens or "all",
            "micro_batch": info["micro_batch"], "grad_accum": info["grad_accum"],
            "attention_impl": s.model.attention_impl, "num_workers": self.world_size,
            "git_sha": code_version(), "versions": package_versions(), "n_train": info["task"].get("n_train"),
            "n_test": info["task"].get("n_test"), "num_classes": len(info["label_names"]),
        }
        if progress.status != "running" and progress.run_id and self.run.is_closed(progress.run_id, progress.status):
            # relaunched after its final checkpoint (e.g. a driver killed seconds after the end):
            # nothing to train and nothing to log
            self.closed = True
            return progress.run_id
        tags = {"trial_key": s.key, "dataset": s.dataset, "variant": s.variant, "fold": s.fold_label}
        run_id = self.run.open(progress.run_id, tags, params, resumed=self.resumed)
        # deliver epochs a kill cut off between checkpoint commit and logging
        self.run.log_epochs(progress.history, skip=self.run.logged_epochs())
        self.label_names = info["label_names"]
        return run_id

    @staticmethod
    def tune_metrics(progress: Progress, metrics: Optional[dict]) -> dict:
        out = {"epoch": progress.epoch, "step": progress.global_step,
               "best_test_acc": max(progress.best_test_acc, 0.0), "trial_status": progress.status}
        if metrics:
            out.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("_")})
        return out

    def commit(self, state: dict, metrics: Optional[dict], progress: Progress) -> None:
        self.reported = True
        tune_metrics = self.tune_metrics(progress, metrics)
        if self.rank != 0:
            ray.train.report(tune_metrics, checkpoint=None)
            return
        tmp = Path(tempfile.mkdtemp(prefix="helix-ckpt-"))
        try:
            save_state(state, tmp)
            self.log(metrics, progress, state)
            if progress.status != "running":
                # the run's record is complete before Tune hears of the end: a scheduler's stop
                # (ASHA stops every trial at max_t) may tear this worker down as soon as it reports
                self.close(progress)
            name = f"epoch{progress.epoch:04d}-step{progress.global_step:08d}" + (
                "-final" if progress.status != "running" else "")
            ray.train.report(tune_metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def log(self, metrics: Optional[dict], progress: Progress, state: dict) -> None:
        if self.run is None:
            return
        if not metrics:
            self.run.buffer.flush()
            return
        self.run.log_epochs([dict(progress.history[-1])])
        if "confusion" in metrics:  # a new best epoch
            self.run.log_artifacts(metrics["confusion"], self.label_names)
            if self.spec.train.log_model:
                self.best_model = {k: v.detach().clone() for k, v in state["model"].items()}

    def finish(self, progress: Progress, info: dict) -> None:
        if not self.reported:  # relaunched after its end: Tune's scheduler and searcher still need a result
            ray.train.report(self.tune_metrics(progress, None), checkpoint=None)
        if "stop_reason" in info:
            self.stop_reason = info["stop_reason"]
        self.close(progress)

    def close(self, progress: Progress) -> None:
        """End the MLflow run with the trial's status, once (idempotent across the final commit and finish)."""
        if self.rank != 0 or self.run is None or self.closed:
            return
        self.closed = True
        if self.best_model is not None:
            self.run.log_model(self.best_model)
        self.run.log_config(to_yaml(self.spec))
        tags = {"stop_reason": self.stop_reason} if self.stop_reason else {}
        self.run.close(progress.status, tags, {"epochs_done": progress.epoch,
                                               "best_test_acc_final": max(progress.best_test_acc, 0.0)},
                       wait_s=float(self.tracking.get("finish_wait_s", 600)))
        try:
            from helix_sweep.sweep import tracking

            tracking.update_parent_aggregates(self.run.client, self.run.experiment_id, self.spec.dataset,
                                              self.spec.variant)
        except Exception as exc:  # aggregates are recomputed by the next finishing fold or the report
            log.warning("parent aggregates of %s/%s not updated: %s", self.spec.dataset, self.spec.variant, exc)


def _step(path: Path) -> int:
    return int(path.name.split("-step")[1].split("-")[0])


def latest_on_disk(run_dir: str) -> Optional[Path]:
    """Our newest complete checkpoint directory (epochEEEE-stepSSSSSSSS[-final]/state.pt) in a run dir."""
    root = Path(run_dir) if run_dir else None
    if root is None or not root.is_dir():
        return None
    found = [d for d in root.glob("epoch*-step*") if (d / "state.pt").is_file()]
    return max(found, key=lambda d: (_step(d), d.name.endswith("-final"))) if found else None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if hasattr(v, "__dict__") and not isinstance(v, type):
            out.update(_flat(v.__dict__, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    logging.basicConfig(level=logging.INFO)
    spec = trial_from_dict(config["trial"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    reporter = RayMlflowReporter(spec, config["tracking"])
    started = time.monotonic()
    progress = run_training(spec, reporter)
    log.info("%s: %s after %.0f s (best test acc %.4f)", spec.key, progress.status,
             time.monotonic() - started, progress.best_test_acc)
