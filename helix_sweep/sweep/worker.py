"""The Ray Train worker of a trial: run_training with a reporter that checkpoints through Ray Train
and logs to the trial's single MLflow run from rank 0.

Order per epoch: write the checkpoint (atomically, into a temp dir) -> ray.train.report, which
persists it to the run's storage -> only then log the epoch's metrics. A kill between the two
loses no metrics: the checkpoint's history holds them and the next start logs what is missing.
The final epoch reports twice: its checkpoint first (without the scheduler's time attribute, so
ASHA cannot stop the trial there), then, once the MLflow run is closed, its full result.

MLflow: opening the run and every write go through the trial run's outage buffer (`trial_run`), so
training never waits for the tracking server; only the trial's end waits, tracking.finish_wait_s
at most, before leaving what is undelivered in a file beside the checkpoints for whoever comes next.

Storage: Ray keeps the newest `keep_checkpoints` it registered; this worker also keeps a copy of
the best epoch's state in best/ and prunes what Ray's record no longer lists among the checkpoints
that were there when the worker started (from before a restart: Ray never deletes those). An
unwritable or full storage stops the trial with CheckpointStorageError,
naming the directory and the intact checkpoint a rerun resumes from.

Where the trial runs: in a Ray Train worker (TrainSession), or, for a trial of one CPU worker on the
driver's own local Ray, in Tune's trial actor itself (ActorSession, trainable.in_actor), which
saves the controller and worker processes a Train run starts per trial. The reporter is the same;
only how a result and a checkpoint reach Ray differs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import ray.train
import torch

from helix_sweep import training
from helix_sweep.config import TrialSpec, to_yaml
from helix_sweep.sweep import schema as S
from helix_sweep.training import (
    CheckpointStorageError, EpochResult, Progress, TrialReport, format_fraction, run_training, save_state,
)

log = logging.getLogger(__name__)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
FINISH_WAIT_S = 30.0  # how long a trial's end waits for an unreachable tracking server (tracking_wait_s)


class TrainSession:
    """A Ray Train worker's way to Ray: Ray Train copies each checkpoint into the run's storage and
    keeps its record of them (RAY_SNAPSHOT), pruning those it registered itself."""

    def place(self) -> tuple[int, int]:
        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def report(self, metrics: dict) -> None:
        ray.train.report(metrics, checkpoint=None)

    def latest(self) -> Optional[dict]:
        """Ray Train's latest checkpoint of the run, loaded (None before the first)."""
        latest = ray.train.get_checkpoint()
        if latest is None:
            return None
        with latest.as_directory() as d:
            return training.load_state(Path(d))

    def persist(self, state: dict, metrics: dict, name: str, run_dir: str) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="helix-ckpt-"))
        try:
            save_state(state, tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def protected(self, run_dir: str, found_at_start: set[str]) -> Optional[set[str]]:
        """Checkpoints not to prune: those Ray's record lists (it prunes them itself, and it refuses to
        restore a run missing one) and those reported since this worker started (Ray's record drops
        one before deleting it, and a folder gone by then fails its controller: seen as "Path not
        found" on a 2-core machine). None while there is no record yet, or in a format we do not
        know: prune nothing then."""
        try:
            snapshot = json.loads((Path(run_dir) / RAY_SNAPSHOT).read_text())
            listed = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("not pruning %s: %s", run_dir, exc)
            return None
        return listed | (training.checkpoint_dirs(run_dir) - found_at_start)


class ActorSession:
    """A trial trained in Tune's trial actor (one CPU worker, no Train run): the checkpoint goes
    straight into the run directory, under the name a Train worker's would have (save_state's temp
    file, then the folder renamed into place: never half there), then the result to Tune. A
    relaunched trial finds it by the run-directory scan every start does (RayMlflowReporter.load)."""

    def place(self) -> tuple[int, int]:
        return 0, 1

    def report(self, metrics: dict) -> None:
        from ray import tune

        tune.report(metrics)

    def latest(self) -> Optional[dict]:
        return None  # nothing beyond the run directory, which load() scans

    def persist(self, state: dict, metrics: dict, name: str, run_dir: str) -> None:
        final, tmp = Path(run_dir) / name, Path(run_dir) / f".{name}.tmp"  # the dot: checkpoint scans skip it
        shutil.rmtree(tmp, ignore_errors=True)
        save_state(state, tmp)
        if final.exists():  # the same step written by a start that died before reporting it
            shutil.rmtree(final)
        tmp.rename(final)
        self.report(metrics)

    def protected(self, run_dir: str, found_at_start: set[str]) -> Optional[set[str]]:
        return set()  # every checkpoint here is ours to prune


class RayMlflowReporter:
    def __init__(self, spec: TrialSpec, tracking: dict, rank: Optional[int] = None, world_size: int = 1,
                 session: TrainSession | ActorSession | None = None):
        self.session = session or TrainSession()
        if rank is None:  # its place in the Train worker group (0 of 1 in Tune's actor)
            rank, world_size = self.session.place()
        self.rank, self.world_size = rank, world_size
        self.spec, self.tracking = spec, tracking
        self.run_dir = tracking.get("run_dir", "")
        self.found_at_start: set[str] = set()  # checkpoint folders from before this worker (load)
        self.run = None
        self.resumed = False
        self.label_names: list[str] = []
        self.closed = False
        self.reported = False  # whether this worker start reported anything to Tune yet
        self.stop_reason = ""

    def load(self) -> Optional[dict]:
        """The newest readable checkpoint: ours in the run's storage directory, else Ray's latest.

        Ray registers a checkpoint in its snapshot after the upload; a controller lost with its node
        in between (seen with ray.cluster_utils.Cluster.remove_node) leaves the snapshot one behind
        or empty, so the run directory is scanned (local or mounted shared storage). A checkpoint
        that does not load (cut short by a full disk) is skipped for the one before it."""
        self.found_at_start = training.checkpoint_dirs(self.run_dir)
        found = training.load_newest(training.checkpoints_on_disk(self.run_dir), warn=log.warning)
        state = found[1] if found else None
        if state is None:
            state = self.session.latest()
        elif found:
            log.info("%s: newest checkpoint %s", self.spec.key, found[0])
        self.resumed = state is not None
        return state

    def start(self, progress: Progress, trial: TrialReport) -> str:
        if self.rank != 0:
            return progress.run_id
        from helix_sweep.sweep.trial_run import TrialRun, code_version, package_versions

        s = self.spec
        log.info("%s: selective scan %s (model.scan_impl=%s), precision %s (train.precision=%s) on %s", s.key,
                 trial.scan_impl, s.model.scan_impl, trial.precision, s.train.precision, trial.device)
        self.run = TrialRun(self.tracking["uri"], s.experiment, s.key, s.dataset, s.variant, s.fold_label,
                            run_dir=self.run_dir, run_id=progress.run_id)
        params = {**run_params(s, trial, self.world_size), "git_sha": code_version(), "versions": package_versions()}
        self.run.take_over_pending()
        if progress.status != "running":
            # relaunched after its final checkpoint (a driver killed seconds after the end, an
            # oom/diverged trial retried): nothing to train; finish() delivers whatever its run lacks
            log.info("%s: relaunched after it ended (%s); not training again", s.key, progress.status)
            self.run.open(params, reopen=False)
            self.run.log_epochs(progress.history)
            return progress.run_id or self.run.run_id
        # opened now, or once the server answers (the run id then goes into the next checkpoint)
        self.run.open(params, resumed=self.resumed)
        # deliver epochs a kill cut off between checkpoint commit and logging
        self.run.log_epochs(progress.history)
        self.label_names = trial.label_names
        try:  # an unwritable storage fails a (re)start at once, not a checkpoint interval later
            training.check_writable(self.run_dir)
        except OSError as exc:
            raise self.storage_failure(exc, progress) from exc
        return self.run.run_id or progress.run_id

    @staticmethod
    def tune_metrics(progress: Progress, metrics: Optional[dict]) -> dict:
        out = {"epoch": progress.epoch, "step": progress.global_step,
               "best_test_acc": max(progress.best_test_acc, 0.0), "trial_status": progress.status}
        if metrics:
            out.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("_")})
        return out

    def commit(self, state: dict, epoch: Optional[EpochResult], progress: Progress) -> None:
        if progress.status == S.OOM and packed(self.spec):
            return  # not terminal on a share of a GPU: the whole-GPU refit resumes from the last checkpoint
        self.reported = True
        result = self.tune_metrics(progress, epoch.metrics if epoch else None)
        final = progress.status != "running"
        # the final checkpoint goes without "epoch": a scheduler (ASHA) acting on it could stop the
        # trial, tearing this worker down before its MLflow run is closed
        first = {k: v for k, v in result.items() if k != "epoch"} if final else result
        best = epoch is not None and epoch.is_best
        if self.rank != 0:
            self.session.report(first)
        else:
            if self.run is not None and self.run.run_id:  # the run found or created since the last checkpoint
                progress.run_id = state["progress"]["run_id"] = self.run.run_id
            try:
                self.persist(state, first, training.checkpoint_name(progress.epoch, progress.global_step, final),
                             best=best)
            except OSError as exc:
                raise self.storage_failure(exc, progress) from exc
            self.log(epoch, progress, state)
            if final:
                self.close(progress)
        if final:
            self.session.report(result)

    def persist(self, state: dict, result: dict, name: str, best: bool) -> None:
        """Rank 0: save and report the checkpoint (the session puts it in the run's storage), keep a
        copy of a new best epoch's state, prune. Raises OSError when a write fails."""
        self.session.persist(state, result, name, self.run_dir)
        if best:
            save_state(state, Path(self.run_dir) / training.BEST_DIR)
        self.prune()

    def prune(self) -> None:
        """Delete checkpoints beyond the newest keep_checkpoints, except those the session protects
        (in a Train worker, those Ray's record still needs)."""
        protected = self.session.protected(self.run_dir, self.found_at_start)
        if protected is None:
            return
        for d in training.prune(self.run_dir, self.spec.train.keep_checkpoints, protected):
            log.info("%s: pruned checkpoint %s", self.spec.key, d.name)

    def storage_failure(self, exc: BaseException, progress: Progress) -> CheckpointStorageError:
        """Record the trial as failed with the reason (unless its run already closed as finished)."""
        error = training.storage_error(self.spec.key, self.run_dir, exc)
        log.error("%s", error)
        self.stop_reason = str(error)
        self.close(replace(progress, status="failed"))
        return error

    def log(self, epoch: Optional[EpochResult], progress: Progress, state: dict) -> None:
        if self.run is None:
            return
        if epoch is None:
            self.run.flush(now=False)
            return
        self.run.log_epochs([dict(progress.history[-1])])
        if epoch.is_best:
            self.run.log_artifacts(epoch.confusion, self.label_names)

    def finish(self, progress: Progress, trial: TrialReport) -> None:
        if self.retried_on_whole_gpu(progress, trial):
            return
        if not self.reported:  # relaunched after its end: Tune's scheduler and searcher still need a result
            self.session.report(self.tune_metrics(progress, None))
        if trial.stop_reason:
            self.stop_reason = trial.stop_reason
        self.close(progress)

    def retried_on_whole_gpu(self, progress: Progress, trial: TrialReport) -> bool:
        """Out of memory on a share of a GPU does not end the trial: the Tune trial fits it again on a
        whole GPU (trainable.train_trial reads the status train_worker returns), resuming this run, so
        the run stays open, with the reason noted."""
        if progress.status != S.OOM or not packed(self.spec):
            return False
        if self.rank == 0 and self.run is not None:  # a tag write, through the run's outage buffer
            self.run.set_tags({S.PACKED_OOM: f"out of memory on {format_fraction(self.spec.budget.gpu_fraction)} "
                                             f"of a GPU, retried on a whole GPU: {trial.stop_reason}"})
        return True

    def close(self, progress: Progress) -> None:
        """End the MLflow run with the trial's status, once (the final commit or finish, whichever first).

        Waits at most tracking.finish_wait_s for an unreachable server, then leaves the undelivered
        writes in the trial's pending file for the driver, the next run or the report, and returns:
        a GPU is not held idle for a tracking server."""
        if self.rank != 0 or self.run is None or self.closed:
            return
        self.closed = True
        reason = self.stop_reason or progress.stop_reason
        best = Path(self.run_dir) / training.BEST_DIR
        log_model = self.spec.train.log_model and progress.status == S.FINISHED and (best / "state.pt").is_file()
        self.run.close(progress.status, {S.STOP_REASON: reason} if reason else {},
                       {S.EPOCHS_DONE: progress.epoch, S.BEST_TEST_ACC_FINAL: max(progress.best_test_acc, 0.0)},
                       wait_s=float(self.tracking.get("finish_wait_s", FINISH_WAIT_S)),
                       config_yaml=to_yaml(self.spec), best_dir=best if log_model else "")


def run_params(spec: TrialSpec, trial: TrialReport, world_size: int) -> dict:
    """The params of a trial's MLflow run: its settings (schema.trial_params), then what its workers
    resolved on their device (precision, scan_impl, micro-batch) and the model's figures."""
    return {
        **S.trial_params(spec),
        "n_params": trial.n_params, "n_params_per_layer": trial.n_params_per_layer, "d_ffn": trial.d_ffn,
        S.TOKENS_PER_CLIP: trial.tokens_per_clip, "micro_batch": trial.micro_batch, "grad_accum": trial.grad_accum,
        "num_workers": world_size, S.SCAN_IMPL: trial.scan_impl, S.PRECISION: trial.precision,
        "n_train": trial.task.get("n_train"), "n_test": trial.task.get("n_test"), S.NUM_CLASSES: len(trial.label_names),
    }


def packed(spec: TrialSpec) -> bool:
    """The trial's worker runs on a share of a GPU, beside other trials."""
    return str(spec.resources.use_gpu).lower() == "true" and spec.budget.gpu_fraction < 1


def keep_freed_memory() -> bool:
    """Ask the C library (glibc's malloc) to keep freed memory for reuse instead of giving it back.

    A CPU training step allocates and frees tensors of a few MB (the scan's (L, B, N, E) states and
    decays: 6.5 MB each at the smoke sizes). By default glibc serves such blocks with mmap or trims
    them off the heap when freed, so steps fault the same pages back in, zero-filled by the kernel:
    in a smoke mamba-raw trial's Train worker 5,000-10,000 minor faults a second and ~3% of its CPU
    in the kernel (in a bare process running the same step, ~25,000 faults and ~50 ms a ~0.35 s
    step). After this, blocks up to 32 MB come from the heap, which keeps up to 1 GiB free: the
    process holds on to its peak. Returns False where there is no mallopt (not glibc) or it refused."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def train_worker(config: dict, session: TrainSession | ActorSession | None = None) -> str:
    """Ray Train's train_loop_per_worker (or, with an ActorSession, the trial in Tune's actor);
    returns the trial's status (rank 0's reaches the driver as the Train result's return_value)."""
    logging.basicConfig(level=logging.INFO)
    spec: TrialSpec = config["trial"]
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    keep_freed_memory()
    reporter = RayMlflowReporter(spec, config["tracking"], session=session)
    started = time.monotonic()
    progress = run_training(spec, reporter)
    log.info("%s: %s after %.0f s (best test acc %.4f)", spec.key, progress.status,
             time.monotonic() - started, progress.best_test_acc)
    return progress.status
