"""check_journal.py <journal> <expected.json>: optuna.load_study reads what mixscale wrote.

Loads the journal with optuna's own JournalStorage(JournalFileBackend(path)), dumps it with
journal_dump.dump_storage and asserts it equals <expected.json> (mixscale's view). Also loads
every study through optuna.load_study and checks trial counts and best values.
"""
import json
import math
import sys

import optuna

from journal_dump import dump_storage, open_storage, same

optuna.logging.set_verbosity(optuna.logging.WARNING)
path, expected_path = sys.argv[1], sys.argv[2]
storage = open_storage(path)
got = dump_storage(storage)
expected = json.load(open(expected_path))
same(got, expected)
for s in expected["studies"]:
    study = optuna.load_study(study_name=s["name"], storage=storage)
    assert len(study.trials) == len(s["trials"]), (len(study.trials), len(s["trials"]))
    done = [t for t in s["trials"] if t["state"] == "COMPLETE" and t["values"] and len(t["values"]) == 1]
    if len(s["directions"]) == 1 and done:
        vals = [v["values"][0] for v in done if not isinstance(v["values"][0], str)]
        if vals:
            best = min(vals) if s["directions"][0] == "MINIMIZE" else max(vals)
            assert math.isclose(study.best_value, best) or study.best_value == best, (study.best_value, best)
print(f"optuna {optuna.__version__}: {len(expected['studies'])} studies, "
      f"{sum(len(s['trials']) for s in expected['studies'])} trials match")
