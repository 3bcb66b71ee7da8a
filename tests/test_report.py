"""The report's statistics: paired differences to a baseline and between two runs, against a
t-interval computed here from the per-seed numbers; `hnal bench compare` on real Parquet."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hnal_ray.cli import main
from hnal_ray.loop.config import StrategyConfig
from hnal_ray.loop.stats import (annotations_to_reach, compare_runs, control_differences, control_pairs,
                                 paired_differences, t95_half_width)


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


def test_each_clustered_hardest_strategy_is_paired_with_its_own_control():
    S = StrategyConfig
    strategies = [S("random", "random"), S("c-hard", "cluster", within="hardest"),
                  S("c-rand", "cluster", within="random"),
                  S("p-hard", "cluster", within="hardest", clusters=20, quota="proportional"),
                  S("p-rand", "cluster", within="random", clusters=20, quota="proportional"),
                  S("q-hard", "cluster", within="hardest", quota="hardness", weight="counting"),
                  S("q-rand", "cluster", within="random", quota="hardness"),        # other weight: not its control
                  S("central", "cluster", within="central"),
                  S("switch", "cluster", within="central", switch_at=500, then={"within": "hardest"})]
    assert control_pairs(strategies) == [("c-hard", "c-rand"), ("p-hard", "p-rand")]
    hard, ctrl = [31.0, 28.0, 35.0, 30.0], [30.0, 30.0, 30.0, 30.0]
    got = control_differences(rows("c-hard", hard, 2) + rows("c-rand", ctrl, 2) + rows("random", [0] * 4, 2),
                              [("c-hard", "c-rand")])
    assert [(d["strategy"], d["control"], d["round"], d["seeds"]) for d in got] == [("c-hard", "c-rand", 2, 4)]
    assert got[0]["diff"] == pytest.approx(1.0)
    half = 3.1824 * np.std(np.subtract(hard, ctrl), ddof=1) / 2  # t, 3 degrees of freedom
    assert (got[0]["ci_low"], got[0]["ci_high"]) == pytest.approx((1.0 - half, 1.0 + half), abs=1e-3)


def test_annotations_to_reach_randoms_final_metric():
    def curve(strategy, values):
        return [{"strategy": strategy, "round": r, "annotated": 100.0 * r, "r1_sum": v} for r, v in enumerate(values)]
    summary = curve("random", [20, 30, 33, 36]) + curve("fast", [20, 36.5, 37, 38]) + curve("slow", [20, 25, 30, 35.9])
    got = {r["strategy"]: r for r in annotations_to_reach(summary)}
    assert got["random"]["annotated"] == 300 and got["random"]["fraction"] == 1
    assert got["fast"]["annotated"] == 100 and got["fast"]["fraction"] == pytest.approx(1 / 3)
    assert got["slow"]["annotated"] is None and got["slow"]["target"] == 36
    assert annotations_to_reach(curve("fast", [1, 2])) == []  # no baseline in the run


def test_intervals_use_the_t_quantile_at_every_sample_size():
    """Known quantiles (printed tables): t(0.975) is 12.706 at 1 degree of freedom, 2.0211 at 40;
    the normal's 1.96 would be 3% too narrow at 41 seeds."""
    for n, t in ((2, 12.7062), (41, 2.0211)):
        d = np.arange(n, dtype=float)
        assert t95_half_width(d) == pytest.approx(t * d.std(ddof=1) / np.sqrt(n), rel=1e-4)
    assert np.isnan(t95_half_width(np.ones(1)))


def test_the_score_job_keeps_its_thresholds(tmp_path):
    """score/thresholds.parquet: every anchor's threshold, equal to the dense reference (sign vectors:
    exact), for both sides and mini-batches; none for a strategy without thresholds."""
    import hnal_ray
    from helpers import write_inputs
    from hnal_ray.score.reference import dense_thresholds

    for side, batch in (("image", None), ("text", None), ("image", 8)):
        paths, raw = write_inputs(tmp_path / f"in-{side}-{batch}", np.random.default_rng(3), n_pool=30, side=side)
        out = tmp_path / f"out-{side}-{batch}"
        hnal_ray.select(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"]), 5, side=side,
                        k=2, threshold_batch=batch, seed=4, out=out)
        got = pq.read_table(out / "thresholds.parquet")
        unit = {n: raw[n] / np.linalg.norm(raw[n], axis=1, keepdims=True) for n in ("text_emb", "image_emb")}
        want = dense_thresholds(unit["text_emb"], raw["owner"], unit["image_emb"], raw["image_ids"], 2, side, batch, 4)
        ids = raw["text_ids"] if side == "image" else raw["image_ids"]
        assert got.column_names == ["text_id" if side == "image" else "image_id", "threshold"]
        order = np.argsort(ids)
        assert got.column(0).to_pylist() == ids[order].tolist()
        np.testing.assert_allclose(got["threshold"].to_numpy(), want[order], rtol=0, atol=1e-6)
    hnal_ray.select(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"]), 5,
                    strategy="random", out=out)
    assert not (out / "thresholds.parquet").exists()  # a later run's outputs never keep an earlier run's


def test_why_selected_reads_the_rounds_picks_and_thresholds(tmp_path):
    """explain() takes the round's own picks (state["selected"]: after a switch or reducible
    reranking too) and the thresholds its score job wrote; here thresholds no k recomputes."""
    from hnal_ray.io import embedding_array
    from hnal_ray.loop.report import explain

    d = tmp_path / "round"
    for sub in ("embeddings/paired", "embeddings/pool", "score"):
        (d / sub).mkdir(parents=True)
    texts = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    pq.write_table(pa.table({"text_id": [10, 11, 12], "image_id": [1, 1, 2], "embedding": embedding_array(texts)}),
                   d / "embeddings/paired/captions.parquet")
    pool = np.array([[1, 0], [0, 1]], np.float32)
    pq.write_table(pa.table({"image_id": [7, 8], "embedding": embedding_array(pool)}), d / "embeddings/pool/images.parquet")
    pq.write_table(pa.table({"text_id": [10, 11, 12], "threshold": [0.5, 0.85, 0.7]}), d / "score/thresholds.parquet")
    pq.write_table(pa.table({"image_id": [7, 8], "score": [0.6, 0.15]}), d / "score/scores.parquet")
    got = explain({"selected": [8, 7]}, d, {10: "a", 11: "b", 12: "c"})
    assert [g["image_id"] for g in got] == [8, 7] and [g["score"] for g in got] == [0.15, 0.6]
    assert got[0]["texts_beaten"] == 2 and [(b["text"], round(b["margin"], 6)) for b in got[0]["beats"]] == \
        [("b", 0.15), ("c", 0.1)]
    assert got[1]["texts_beaten"] == 1 and [(b["text"], round(b["margin"], 6)) for b in got[1]["beats"]] == [("a", 0.5)]
