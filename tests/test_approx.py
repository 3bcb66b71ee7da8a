"""The approximate mode: exact when it searches everything, and its recall is measurable."""
import numpy as np
import pytest

from helpers import quantized
from hnal_ray.bench.approx import build_margin_index, default_nlist, score_pool_approx
from hnal_ray.score.reference import dense_scores, dense_select
from hnal_ray.score.selection import select_top
from hnal_ray.data.synthetic import clustered_embeddings, unit


@pytest.mark.parametrize("weight", ["surplus", "counting"])
@pytest.mark.parametrize("seed", range(3))
def test_exhaustive_search_is_exact(weight, seed):
    """top_m = all anchors and every list probed: the same scores as the dense reference."""
    rng = np.random.default_rng(40 + seed)
    pool, anchors = quantized(rng, 50, 6), quantized(rng, 40, 6)
    th = (rng.integers(-4, 5, 40) / 4).astype(np.float32)
    res = score_pool_approx(pool, anchors, th, weight, top_m=40, nprobe=1000, nlist=4, seed=seed, block_pool=7)
    want_s, want_m = dense_scores(pool, anchors, th, weight)
    np.testing.assert_array_equal(res.scores, want_s)
    np.testing.assert_array_equal(res.max_margin, want_m.astype(np.float32))


def test_infinite_thresholds():
    rng = np.random.default_rng(2)
    pool, anchors = quantized(rng, 20, 4), quantized(rng, 10, 4)
    th = (rng.integers(-2, 3, 10) / 4).astype(np.float32)
    th[0], th[1:3] = -np.inf, np.inf
    for weight in ("surplus", "counting"):
        res = score_pool_approx(pool, anchors, th, weight, top_m=10, nprobe=10, nlist=2)
        want_s, _ = dense_scores(pool, anchors, th, weight)
        np.testing.assert_array_equal(res.scores, want_s)
        assert np.isposinf(res.max_margin).all()
    none = score_pool_approx(pool, anchors, np.full(10, np.inf, np.float32), "counting")
    assert (none.scores == 0).all() and np.isneginf(none.max_margin).all()
    with pytest.raises(ValueError):
        score_pool_approx(pool, anchors, th, "hinge")


def test_recall_grows_with_the_search():
    """Clustered data: a reused index; probing more lists never loses selection recall here."""
    rng = np.random.default_rng(5)
    emb, _ = clustered_embeddings(rng, 3000, 32, 20, spread=0.15)
    anchors, pool = unit(emb[:600] + 0.02 * rng.standard_normal((600, 32))), emb[600:]
    th = np.quantile(pool[:200] @ anchors.T, 0.99, axis=0).astype(np.float32)
    want_s, want_m = dense_scores(pool, anchors, th, "surplus")
    ids = np.arange(len(pool), dtype=np.int64)
    want = set(dense_select(ids, want_s, want_m, 100).tolist())
    index = build_margin_index(anchors, th, nlist=default_nlist(600), seed=1)
    recall = []
    for nprobe in (1, 4, index.nlist):
        res = score_pool_approx(pool, anchors, th, "surplus", top_m=600, nprobe=nprobe, index=index)
        recall.append(len(want & set(select_top(ids, res.scores, res.max_margin, 100).ids.tolist())) / 100)
        assert 0 < res.pairs <= len(pool) * len(anchors)
    assert recall == sorted(recall) and recall[-1] == 1.0 and recall[0] < 1.0, recall
