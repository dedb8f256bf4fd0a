"""The study's tables and figures, regenerated from a sweep's MLflow runs.

    python -m helix_sweep.report [experiment=NAME] [tracking_uri=URI] [workdir=DIR] [out=dashboards]

reads the experiment's runs through the MLflow client and writes into <out>/<experiment>/:

    index.html                 self-contained page: every table and figure (embedded), links to the files
    tables/<name>.md, .html    the paper's Tables 1-5: feasibility by sequence length (ok / slow / OOM measured,
                               planned OOM by the plan, ruled OOM by a grid rule with the plan's own verdict, the
                               paper's cell, the attention implementation, and the plan with naive attention
                               against SDPA), fold tables (ESC-50 style, mean ±
                               std over folds), single-split (Speech Commands), long-memory (concat) and
                               speaker-ID tables with best and final (last epoch) test accuracy; each beside
                               the paper's numbers
    figures/*.png              Figure 1 (accuracy, raw - mel gap and HELIX - pure Mamba by sequence length),
                               raw vs mel bars with best epochs (Figures 2-3), fold-1 test curves with 7-epoch
                               smoothing and best lines (Figures 4-7), per-fold curves
    trials.csv                 one row per trial run (the numbers every table is built from)

dashboards/README.md maps each table and figure of the paper to its file.

The package, in reading order: `loading` (the only module that imports MLflow: runs -> a `results.Sweep`),
`results` (Sweep, Cell, Trial), `paper` (the paper's numbers and the study's names), `tables`,
`figures`, `page` (the files and index.html), `__main__` (the command line).

What it reads is the schema in helix_sweep/sweep/schema.py: runs tagged kind=trial with tags dataset,
variant, fold ("1".."10" or "split"), status, trial_key; metrics with step = epoch: best_test_acc,
test_acc, train_acc, train_loss, val_acc, test_acc_at_best_val, epoch_seconds, peak_mem_mb,
epochs_done, best_epoch; params tokens_per_clip, pool_tokens, frontend, attention_impl, plan.feasibility(.naive,
.sdpa), num_classes, task.subset, epochs, stop_after_epochs; the stop_reason tag (a grid rule's reason). Parent runs
(kind=parent) may carry `folds_planned`, so folds not started yet show as pending; a dataset x variant with neither
a parent nor a trial run is not in the sweep (—).

Numbers: accuracies are stored as fractions and shown in percent. Fold aggregates are the mean and the
sample standard deviation (ddof=1) of the per-fold best test accuracy, over finished folds only; a
partial aggregate says how many folds it covers. "best test" selects the epoch on the test set, as the
paper does; where a validation split exists, "test @ best val" is the test accuracy at the epoch with
the best validation accuracy, the unbiased figure.
"""
