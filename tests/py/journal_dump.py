"""Canonical JSON dump of an Optuna storage, compared with mixscale's replay by tests/journal.rs.

Floats that are not finite become the strings "NaN", "Infinity", "-Infinity"; datetimes are
UTC ISO-8601 with microseconds and "+00:00" (what the journal stores); distributions are the
parsed `distribution_to_json` objects.
"""
import json
import math
from datetime import timezone

import optuna
from optuna.distributions import distribution_to_json


def num(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return x


def jsonable(v):
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return num(v)


def when(dt):
    if dt is None:
        return None
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def dump_storage(storage):
    out = []
    for s in storage.get_all_studies():
        sid = s._study_id
        trials = []
        for t in storage.get_all_trials(sid, deepcopy=False):
            trials.append({
                "trial_id": t._trial_id,
                "number": t.number,
                "state": t.state.name,
                "params": {k: [jsonable(v), json.loads(distribution_to_json(t.distributions[k]))] for k, v in t.params.items()},
                "values": None if t.values is None else [num(v) for v in t.values],
                "intermediate": {str(k): num(v) for k, v in t.intermediate_values.items()},
                "user_attrs": jsonable(t.user_attrs),
                "system_attrs": jsonable(t.system_attrs),
                "datetime_start": when(t.datetime_start),
                "datetime_complete": when(t.datetime_complete),
            })
        out.append({
            "study_id": sid,
            "name": s.study_name,
            "directions": [d.name for d in s.directions],
            "user_attrs": jsonable(storage.get_study_user_attrs(sid)),
            "system_attrs": jsonable(storage.get_study_system_attrs(sid)),
            "trials": trials,
        })
    return {"studies": out}


def open_storage(path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    return JournalStorage(JournalFileBackend(path))


def same(a, b, where="$"):
    """Python equality (1 == 1.0), reporting the first difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            raise AssertionError(f"{where}: keys {sorted(a)} != {sorted(b)}")
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            raise AssertionError(f"{where}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif a != b or type(a) is bool or type(b) is bool and type(a) is not type(b):
        if not (a == b and type(a) is type(b)):
            raise AssertionError(f"{where}: {a!r} != {b!r}")
