"""`hnal bench table` / `hnal bench choose`: loop runs pooled over disjoint seeds, the protocol's
choice rule, on metrics written as a loop writes them (known answers, scipy's t for the CIs)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from hnal_ray.bench.study import choose, pooled_rows, study_table
from hnal_ray.cli import main
from hnal_ray.io import InputError


def write_run(path, seeds, effects, config=None, noise=1.0, seed=0):
    """A loop run's config.json and metrics.parquet: random ~ 30 + round; strategy s = random + effects[s][round]."""
    rng = np.random.default_rng(seed)
    rows = []
    for sd in seeds:
        base = {r: 30.0 + r + rng.normal() for r in range(4)}
        rows.append({"strategy": "random", "seed": sd, "round": 0, "r1_sum": base[0], "annotated": 0})
        for r in (1, 2, 3):
            rows.append({"strategy": "random", "seed": sd, "round": r, "r1_sum": base[r], "annotated": 100 * r})
            for s, eff in effects.items():
                rows.append({"strategy": s, "seed": sd, "round": r, "r1_sum": base[r] + eff[r - 1] + noise * rng.normal(),
                             "annotated": 100 * r})
    for m in ("rsum", "i2t_R@1", "t2i_R@1"):
        for row in rows:
            row[m] = row["r1_sum"]
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "metrics.parquet")
    (path / "config.json").write_text(json.dumps((config or {"seed_size": 300}) | {"seeds": list(seeds)}))
    return rows


def test_pooling_needs_disjoint_seeds_and_one_config(tmp_path):
    a = write_run(tmp_path / "a", range(0, 10), {"x": [1, 1, 1]})
    b = write_run(tmp_path / "b", range(10, 20), {"x": [1, 1, 1]}, seed=1)
    rows, cfg = pooled_rows([tmp_path / "a", tmp_path / "b"])
    assert len(rows) == len(a) + len(b) and cfg["seeds"] == list(range(20))
    write_run(tmp_path / "c", range(5, 15), {"x": [1, 1, 1]})
    with pytest.raises(InputError, match="seed 5 is also in"):
        pooled_rows([tmp_path / "a", tmp_path / "c"])
    write_run(tmp_path / "d", range(30, 40), {"x": [1, 1, 1]}, config={"seed_size": 1000})
    with pytest.raises(InputError, match="differs .* in seed_size"):
        pooled_rows([tmp_path / "a", tmp_path / "d"])


def test_table_cells_are_the_paired_t_intervals(tmp_path, capsys):
    write_run(tmp_path / "a", range(0, 8), {"x": [2, 0, -1]})
    write_run(tmp_path / "b", range(8, 20), {"x": [2, 0, -1]}, seed=1)
    rows, _ = pooled_rows([tmp_path / "a", tmp_path / "b"])
    d = np.array([x["r1_sum"] - next(y["r1_sum"] for y in rows if y["strategy"] == "random"
                                      and y["seed"] == x["seed"] and y["round"] == 1)
                  for x in rows if x["strategy"] == "x" and x["round"] == 1])
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    text = study_table(rows)
    assert f"({d.mean():+.1f} [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}])" in text
    assert "20 seeds (0-19)" in text
    assert main(["bench", "table", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.strip() == text


def test_choice_rule(tmp_path, capsys):
    """Below 0 in one cell: not eligible however good elsewhere; ties within 0.1 go to the simpler;
    nothing above 0: random."""
    effects = {"tcm": [9, 9, -4], "maxherding": [2.0, 2.0, 2.0], "probcover": [2.05, 2.05, 2.05],
               "typiclust": [1, 1, 1]}
    r1 = write_run(tmp_path / "r1", range(20), effects, noise=0.3)
    r3 = write_run(tmp_path / "r3", range(20), effects, noise=0.3, seed=2)
    res = choose({"r1": r1, "r3": r3})
    by = {t["strategy"]: t for t in res["candidates"]}
    assert by["tcm"]["below"] == ["r1 round 3", "r3 round 3"] and res["cells"] == 6
    assert res["winner"] == "maxherding"  # probcover's mean is higher by less than 0.1
    assert main(["bench", "choose", f"r1={tmp_path / 'r1'}", f"r3={tmp_path / 'r3'}"]) == 0
    assert "winner: maxherding" in capsys.readouterr().out
    flat = write_run(tmp_path / "flat", range(20), {"typiclust": [0, 0, 0]}, noise=0.0)
    assert choose({"r1": flat})["winner"] is None
    assert main(["bench", "choose", "r1"]) == 2
