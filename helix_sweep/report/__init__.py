"""The study's tables and figures, regenerated from a sweep's MLflow runs.

    python -m helix_sweep.report [experiment=NAME] [tracking_uri=URI] [workdir=DIR] [out=dashboards]

reads the experiment's runs through the MLflow client and writes into <out>/<experiment>/:

    index.html                 self-contained page: every table and figure (embedded), links to the files
    tables/<name>.md, .html    fold tables (ESC-50 style, mean ± std over folds), single-split tables
                               (Speech Commands style, with epochs reached), long-memory (concat) and
                               speaker-ID tables, the feasibility table; each beside the paper's numbers
    figures/*.png              accuracy bars raw vs mel (fold error bars), raw-minus-mel gap per backbone,
                               training curves per variant, accuracy vs sequence length
    trials.csv                 one row per trial run (the numbers every table is built from)

The package, in reading order: `loading` (the only module that imports MLflow: runs -> a `results.Sweep`),
`results` (Sweep, Cell, Trial), `paper` (the paper's numbers and the study's names), `tables`,
`figures`, `page` (the files and index.html), `__main__` (the command line).

What it reads is the schema in helix_sweep/sweep/schema.py: runs tagged kind=trial with tags dataset,
variant, fold ("1".."10" or "split"), status, trial_key; metrics with step = epoch: best_test_acc,
test_acc, train_acc, train_loss, val_acc, test_acc_at_best_val, epoch_seconds, peak_mem_mb,
epochs_done, best_epoch; params tokens_per_clip, pool_tokens, frontend. Parent runs (kind=parent) may
carry `folds_planned`, so folds not started yet show as pending.

Numbers: accuracies are stored as fractions and shown in percent. Fold aggregates are the mean and the
sample standard deviation (ddof=1) of the per-fold best test accuracy, over finished folds only; a
partial aggregate says how many folds it covers. "best test" selects the epoch on the test set, as the
paper does; where a validation split exists, "test @ best val" is the test accuracy at the epoch with
the best validation accuracy, the unbiased figure.
"""
