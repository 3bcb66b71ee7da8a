"""The report's statistics: paired differences to a baseline and between two runs, against a
t-interval computed here from the per-seed numbers; `hnal bench compare` on real Parquet."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hnal_ray.cli import main
from hnal_ray.loop.report import compare_runs, paired_differences


def rows(strategy, values, rnd=1):
    return [{"strategy": strategy, "seed": s, "round": rnd, "r1_sum": float(v)} for s, v in enumerate(values)]


def test_paired_difference_is_the_t_interval_of_per_seed_differences():
    rng = np.random.default_rng(0)
    base, other = rng.normal(30, 3, 10), rng.normal(32, 3, 10)
    d = paired_differences(rows("random", base) + rows("x", other))
    assert len(d) == 1 and d[0]["seeds"] == 10
    diff = other - base
    half = 2.2622 * diff.std(ddof=1) / np.sqrt(10)  # Student's t, 97.5th percentile, 9 degrees of freedom
    lo, hi = diff.mean() - half, diff.mean() + half
    assert d[0]["diff"] == pytest.approx(diff.mean()) and (d[0]["ci_low"], d[0]["ci_high"]) == pytest.approx((lo, hi), abs=1e-3)
    # a seed the baseline lacks is left out of the pairing
    assert paired_differences(rows("random", base[:7]) + rows("x", other))[0]["seeds"] == 7


def test_compare_runs_pairs_each_strategy_with_itself_round_0_included(tmp_path, capsys):
    a = rows("random", [30, 31, 29], 0) + rows("random", [33, 35, 34]) + rows("hard", [25, 26, 27])
    b = rows("random", [31, 32, 30], 0) + rows("random", [36, 37, 38]) + rows("hard", [25, 26, 27])
    got = {(d["strategy"], d["round"]): d for d in compare_runs(a, b)}
    assert got[("random", 0)]["diff"] == pytest.approx(1.0) and got[("random", 0)]["ci_low"] == pytest.approx(1.0)
    assert got[("random", 1)]["diff"] == pytest.approx(3.0) and got[("hard", 1)]["diff"] == 0
    for name, r in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        pq.write_table(pa.Table.from_pylist(r), tmp_path / name / "metrics.parquet")
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "| random | 1 | 3 | +3.0 |" in capsys.readouterr().out
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "missing/metrics.parquet" in capsys.readouterr().err
