"""make_fixture.py <dir>: regenerates tests/data/journal/optuna5.{log,expected.json}.

A journal written by optuna itself (5.0.0) exercising every op mixscale replays: several
studies (one multi-objective, one deleted and re-created), TPE with float/log/int/step/
categorical params, intermediate values incl. NaN and inf, pruned/failed/NaN-valued trials,
user and system attrs, enqueued (WAITING) and template trials, a study-level attr, a param
with an incompatible distribution (which optuna drops). The expected JSON is optuna's own view
(journal_dump.dump_storage). Run with the optuna the README names; commit both files.
"""
import json
import math
import os
import sys

import optuna
from optuna.distributions import FloatDistribution, IntDistribution, CategoricalDistribution

from journal_dump import dump_storage, open_storage

optuna.logging.set_verbosity(optuna.logging.ERROR)
out = sys.argv[1]
path = os.path.join(out, "optuna5.log")
if os.path.exists(path):
    os.remove(path)
storage = open_storage(path)

tmp = optuna.create_study(study_name="scratch", storage=storage)
tmp.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
optuna.delete_study(study_name="scratch", storage=storage)

study = optuna.create_study(study_name="mixers", storage=storage, direction="minimize",
                            sampler=optuna.samplers.TPESampler(seed=1))
study.set_user_attr("sweep", {"file": "sweeps/mixers.yaml", "budget": 1e18})
study.enqueue_trial({"lr": 0.001, "d_model": 256, "mixer": "mamba", "ff_mult": 2.5})


def objective(t):
    lr = t.suggest_float("lr", 1e-4, 1e-2, log=True)
    d = t.suggest_int("d_model", 128, 512, step=128)
    mixer = t.suggest_categorical("mixer", ["attn", "mamba", "hyena"])
    ff = t.suggest_float("ff_mult", 1.0, 4.0, step=0.5)
    heads = t.suggest_int("heads", 1, 16, log=True)
    t.set_user_attr("n_params", d * d * 12)
    t.set_user_attr("note", "ünïcode ✓")
    loss = 2.0 + 100 * lr + 1.0 / d + ff / 10 + heads / 100
    for step in (1, 2, 3):
        v = loss + 1.0 / step
        if t.number == 3 and step == 2:
            v = float("nan")
        if t.number == 4 and step == 3:
            v = float("inf")
        t.report(v, step * 100)
        if t.number == 5 and step == 2:
            raise optuna.TrialPruned()
    if t.number == 6:
        raise RuntimeError("diverged")
    if t.number == 7:
        return float("nan")
    if t.number == 8:
        return float("inf")
    return loss


study.optimize(objective, n_trials=10, catch=(RuntimeError,))
study.add_trial(optuna.trial.create_trial(
    params={"lr": 0.003, "d_model": 512, "mixer": "hyena"},
    distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True), "d_model": IntDistribution(128, 512, step=128),
                   "mixer": CategoricalDistribution(["attn", "mamba", "hyena"])},
    value=2.7, intermediate_values={100: 3.0, 200: 2.75}, user_attrs={"imported": True}))
# An incompatible distribution for an existing param: optuna drops it from the trial.
t = study.ask()
try:  # the issuing worker raises, but the op is already in the file; other readers skip it
    storage.set_trial_param(t._trial_id, "mixer", 0, CategoricalDistribution(["attn", "rwkv"]))
except ValueError:
    pass
t.suggest_float("lr", 1e-4, 1e-2, log=True)
storage.set_trial_system_attr(t._trial_id, "worker", "host-0")

multi = optuna.create_study(study_name="pareto", storage=storage, directions=["minimize", "maximize"],
                            sampler=optuna.samplers.RandomSampler(seed=2))
multi.optimize(lambda t: (t.suggest_float("x", -1, 1), t.suggest_categorical("c", [1, 2.5, None, True])), n_trials=4)
optuna.create_study(study_name="scratch", storage=storage, direction="maximize")

json.dump(dump_storage(storage), open(os.path.join(out, "optuna5.expected.json"), "w"), indent=1, ensure_ascii=False)
print("wrote", path)
