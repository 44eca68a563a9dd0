"""check_tb.py <tb_dir> <metrics.csv>: TensorBoard's EventAccumulator reads mixscale's event file.

Every numeric metrics.csv column (except step) must be a scalar tag with one (step, value) per
row that has the value; values equal the CSV's to its printed precision.
"""
import csv
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def half_unit(text):
    """Half a unit of the last digit printed: '3.141593', '1.000000e-2', '1234.5'."""
    mant, _, exp = text.lower().partition("e")
    decimals = len(mant.partition(".")[2])
    return 0.5 * 10.0 ** (int(exp or 0) - decimals)


tb_dir, metrics = sys.argv[1], sys.argv[2]
acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
acc.Reload()
rows = list(csv.DictReader(open(metrics)))
tags = set(acc.Tags()["scalars"])
for col in rows[0]:
    if col == "step":
        continue
    want = [(int(r["step"]), r[col]) for r in rows if r[col] != ""]
    assert col in tags, (col, sorted(tags))
    got = [(e.step, e.value) for e in acc.Scalars(col)]
    assert [s for s, _ in got] == [s for s, _ in want], (col, got, want)
    for (s, g), (_, printed) in zip(got, want):
        # The event holds the f32 of the value the CSV printed to its last digit.
        w = float(printed)
        assert abs(g - w) <= half_unit(printed) * 1.0001 + abs(w) * 2.0**-23, (col, s, g, printed)
print(f"tensorboard: {len(tags)} tags x {len(rows)} rows match metrics.csv")
