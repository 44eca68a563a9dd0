"""continue_study.py <journal> <study_name> <n_trials> <out.json>: Python's optuna continues a study.

Runs n_trials more trials with TPE in the study mixscale created (same search space: lr log
float, d_model int step 128, mixer categorical), reporting intermediate values, pruning some,
failing one (its first ask() runs a trial mixscale enqueued), then enqueues a trial, sets a
study attr, and dumps the whole storage (journal_dump.dump_storage).
"""
import json
import sys

import optuna

from journal_dump import dump_storage, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
path, name, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
storage = open_storage(path)
study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.TPESampler(seed=0))
for i in range(n):
    t = study.ask()
    lr = t.suggest_float("lr", 1e-4, 1e-2, log=True)
    d = t.suggest_int("d_model", 128, 512, step=128)
    mixer = t.suggest_categorical("mixer", ["attn", "mamba", "hyena"])
    t.set_user_attr("writer", "python")
    loss = 3.0 + 1000 * lr / d + (0.1 if mixer == "attn" else 0.0)
    t.report(loss + 1.0, 100)
    if i == 1:
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
        continue
    if i == 2:
        study.tell(t, state=optuna.trial.TrialState.FAIL)
        continue
    t.report(loss + 0.5, 200)
    study.tell(t, loss)
study.enqueue_trial({"lr": 0.005, "d_model": 256, "mixer": "hyena"}, user_attrs={"from": "python-enqueue"})
study.set_user_attr("continued_by", "python")
json.dump(dump_storage(storage), open(out, "w"))
