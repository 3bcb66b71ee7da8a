"""The cluster-quota strategy against the dense reference: exact, and the same for any shard count."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import _unit, write_inputs
from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.score.baselines import random_keys
from hnal_ray.score.clusters import assign, kmeans, per_cluster_top, quota_select
from hnal_ray.score.job import LocalBackend, run_score
from hnal_ray.score.reference import dense_assign, dense_quota_select, dense_scores, dense_thresholds
from hnal_ray.score.selection import Ranked


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quota", ["equal", "proportional"])
def test_quota_merge_of_shard_candidates_equals_dense(seed, quota):
    rng = np.random.default_rng(seed)
    n, k, budget = 200, int(rng.integers(2, 12)), int(rng.integers(1, 40))
    ids = rng.permutation(10_000)[:n].astype(np.int64)
    scores = rng.integers(0, 4, n).astype(np.float64)                      # many ties
    margin = np.where(rng.random(n) < 0.2, np.nan, rng.integers(-3, 3, n) / 4).astype(np.float32)
    cluster = rng.integers(0, k, n)
    want = dense_quota_select(ids, scores, margin, cluster, k, budget, quota)
    for shards in (1, 3, 7):
        cuts = np.linspace(0, n, shards + 1).astype(int)
        parts = [per_cluster_top(ids[a:b], scores[a:b], margin[a:b], cluster[a:b], budget)
                 for a, b in zip(cuts[:-1], cuts[1:])]
        cand = Ranked(*(np.concatenate([getattr(p, f) for p, _ in parts]) for f in ("ids", "scores", "max_margin")))
        got = quota_select(cand, np.concatenate([c for _, c in parts]), np.bincount(cluster, minlength=k), budget, quota)
        assert got.ids.tolist() == want.tolist()


def test_assignment_is_row_independent_and_matches_dense():
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((300, 16))).astype(np.float32)
    centres = kmeans(x[:100], 8, seed=3)
    assert centres.shape == (8, 16) and np.array_equal(centres, kmeans(x[:100], 8, seed=3))
    full = assign(x, centres)
    assert np.array_equal(full, dense_assign(x, centres))
    assert np.array_equal(np.concatenate([assign(x[i:i + 37], centres, block=5) for i in range(0, 300, 37)]), full)


def job(paths, out, shards, **kw):
    """`shards` in-process shards of the 80-row pool (0: one), streamed in blocks of 5 rows."""
    cfg = ScoreConfig(budget=kw.pop("budget", 9), strategy="cluster", shard_rows=-(-80 // shards) if shards else 10**6,
                      stream_rows=5, **kw)
    return run_score(ScoreInputs(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"])),
                     cfg, out, lambda: LocalBackend("cpu"))


@pytest.mark.parametrize("within,quota,side", [("hardest", "equal", "image"), ("random", "equal", "image"),
                                               ("hardest", "proportional", "text"), ("central", "equal", "image"),
                                               ("hardest", "hardness", "image"), ("random", "hardness", "text")])
def test_cluster_job_equals_dense_for_any_shard_count(tmp_path, within, quota, side):
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(7), n_pool=80, side=side)
    kw = dict(within=within, quota=quota, clusters=6, cluster_sample=50, seed=4, side=side)
    summaries = {s: job(paths, tmp_path / f"s{s}", s, **kw) for s in (0, 1, 2, 3)}
    id_col = "image_id" if side == "image" else "text_id"
    # the reference: the same seeded sample and k-means, then dense scores, assignment and quotas
    pool_ids, pool = raw["pool_ids"], _unit(raw["pool_emb"])
    rows = np.lexsort((pool_ids, random_keys(pool_ids, 4)))[:50]
    rows = rows[np.argsort(pool_ids[rows])]
    centres = kmeans(pool[rows].astype(np.float32), 6, 4)
    cluster = dense_assign(pool.astype(np.float32), centres)
    img, txt = _unit(raw["image_emb"]), _unit(raw["text_emb"])
    th = dense_thresholds(txt, raw["owner"], img, raw["image_ids"], 1, side)
    hardness, _ = dense_scores(pool, txt if side == "image" else img, th, "surplus")
    if within == "random":
        scores, margin = random_keys(pool_ids, 4), np.full(len(pool_ids), np.nan)
    elif within == "central":
        scores = -((pool.astype(np.float32).astype(np.float64) - centres[cluster]) ** 2).sum(1)
        margin = np.full(len(pool_ids), np.nan)
    else:
        scores, margin = dense_scores(pool, txt if side == "image" else img, th, "surplus")
    want = dense_quota_select(pool_ids, scores, margin, cluster, 6, 9, quota, hardness)
    if quota == "hardness":  # the data has clusters of different hardness, so the quota matters
        assert len(set(np.bincount(cluster[hardness > 0], minlength=6).tolist())) > 1
    for s in summaries:
        sel = pq.read_table(tmp_path / f"s{s}" / "selection.parquet")
        assert sel[id_col].to_pylist() == want.tolist(), s
        got = pq.read_table(tmp_path / f"s{s}" / "scores.parquet").sort_by(id_col)
        order = np.argsort(pool_ids)
        assert got["cluster"].to_pylist() == cluster[order].tolist()
        if s:
            assert pq.read_table(tmp_path / f"s{s}" / "scores.parquet").sort_by(id_col).to_pandas().equals(
                pq.read_table(tmp_path / "s0" / "scores.parquet").sort_by(id_col).to_pandas())  # NaN == NaN
    assert len({json.dumps(sorted(np.asarray(sel).tolist())) for sel in
                (pq.read_table(tmp_path / f"s{s}" / "selection.parquet")[id_col] for s in summaries)}) == 1


def test_reducible_selection_is_the_top_of_the_difference():
    from hnal_ray.score.selection import select_reducible

    ids = np.arange(10) * 3
    cur = np.array([5, 4, 3, 2, 1, 0, np.inf, 7, 7, 0.5])
    ref = np.array([5, 0, 3, 0, 1, 0, np.inf, 1, 6, 0.0])
    margin = np.linspace(0.1, 0.2, 10).astype(np.float32)
    got = select_reducible(ids, cur, ids, ref, margin, 4)
    # differences 0 4 0 2 0 0 0(inf-inf) 6 1 0.5: 7 -> 21, 1 -> 3, 3 -> 9, 8 -> 24
    assert got.ids.tolist() == [21, 3, 9, 24] and got.scores.tolist() == [6, 4, 2, 1]
    with pytest.raises(ValueError, match="same items"):
        select_reducible(ids, cur, ids[::-1], ref, margin, 4)
