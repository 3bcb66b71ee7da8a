"""Oracle tests: blocked/sharded kernels against the dense float64 reference on seeded data."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import paired_set, quantized
from hnal_ray.score.baselines import coreset_select, random_keys
from hnal_ray.score.reference import dense_scores, dense_select, dense_thresholds
from hnal_ray.score.scoring import score_pool
from hnal_ray.score.selection import Ranked, merge_top, select_top
from hnal_ray.score.thresholds import kth, merge_topk, minibatch_thresholds, negative_topk


def kernel_thresholds(image_ids, image_emb, owner, text_emb, k, side, n_shards=1, rng=None):
    """Full-batch thresholds through the sharded path: per-shard top-k, one merge."""
    if side == "image":
        anchors, a_group, keys, k_group = text_emb, owner, image_emb, image_ids
    else:
        anchors, a_group, keys, k_group = image_emb, image_ids, text_emb, owner
    cuts = np.sort(rng.choice(np.arange(1, len(keys)), n_shards - 1, replace=False)) if n_shards > 1 else []
    parts = [negative_topk(anchors, a_group, keys[s], k_group[s], k)
             for s in np.split(np.arange(len(keys)), cuts)]
    return kth(merge_topk(parts, k), k)


@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("seed", range(12))
def test_full_batch_thresholds_match_dense(side, seed):
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(2, 25))
    image_ids, image_emb, owner, text_emb = paired_set(rng, n_images, 4, int(rng.integers(1, 9)))
    for k in (1, 2, 3, n_images + 2):  # the last one exceeds the number of negatives
        want = dense_thresholds(text_emb, owner, image_emb, image_ids, k, side)
        for shards in (1, 2, 3):
            if shards > (len(image_ids) if side == "image" else len(owner)):
                continue
            got = kernel_thresholds(image_ids, image_emb, owner, text_emb, k, side, shards, rng)
            np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"k={k} shards={shards}")


@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("seed", range(8))
def test_minibatch_thresholds_match_dense(side, seed):
    rng = np.random.default_rng(100 + seed)
    image_ids, image_emb, owner, text_emb = paired_set(rng, int(rng.integers(3, 30)), 3, 4)
    for batch in (2, 3, 7, 128):
        for k in (1, 2, 4):
            want = dense_thresholds(text_emb, owner, image_emb, image_ids, k, side, batch, seed)
            got = minibatch_thresholds(text_emb, owner, image_emb, image_ids, k, batch, seed, side)
            np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"batch={batch} k={k}")


def test_minibatch_mode_differs_from_full_batch():
    """The mini-batch thresholds are a real restriction: never above, usually below full batch."""
    rng = np.random.default_rng(7)
    image_ids, image_emb, owner, text_emb = paired_set(rng, 200, 2, 8)
    full = dense_thresholds(text_emb, owner, image_emb, image_ids, 1, "image")
    mini = minibatch_thresholds(text_emb, owner, image_emb, image_ids, 1, 16, 0, "image")
    assert (mini <= full + 1e-6).all() and (mini < full - 1e-6).mean() > 0.5


@pytest.mark.parametrize("weight", ["surplus", "counting"])
@pytest.mark.parametrize("blocks", [(1, 1), (3, 5), (7, 2), (4096, 8192)])
@pytest.mark.parametrize("seed", range(4))
def test_scores_match_dense(weight, blocks, seed):
    rng = np.random.default_rng(200 + seed)
    pool, anchors = quantized(rng, 23, 6), quantized(rng, 17, 6)
    th = (rng.integers(-4, 5, 17) / 4).astype(np.float32)
    th[rng.random(17) < 0.2] = -np.inf if weight == "counting" else th[0]
    got = score_pool(pool, anchors, th, weight, block_pool=blocks[0], block_anchor=blocks[1])
    want_s, want_m = dense_scores(pool, anchors, th, weight)
    np.testing.assert_array_equal(got.scores, want_s)
    np.testing.assert_array_equal(got.max_margin, want_m.astype(np.float32))
    assert got.pairs == 23 * 17


def test_minus_infinity_threshold_counts_every_item():
    pool, anchors = quantized(np.random.default_rng(0), 5, 3), quantized(np.random.default_rng(1), 2, 3)
    th = np.array([-np.inf, 10.0], np.float32)
    assert (score_pool(pool, anchors, th, "counting").scores == 1).all()
    assert np.isposinf(score_pool(pool, anchors, th, "surplus").scores).all()


def test_continuous_unit_vectors_agree_to_float32_rounding():
    """Unit vectors in general position: the kernel (float32) and the reference (float64)."""
    rng = np.random.default_rng(3)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    image_ids = np.arange(300, dtype=np.int64)
    image_emb, pool = unit(rng.standard_normal((300, 32))), unit(rng.standard_normal((500, 32)))
    owner = np.repeat(image_ids, 2)
    text_emb = unit(image_emb[owner] + 0.5 * rng.standard_normal((600, 32)))
    th_ref = dense_thresholds(text_emb, owner, image_emb, image_ids, 2, "image")
    th = kernel_thresholds(image_ids, image_emb, owner, text_emb, 2, "image", 3, rng)
    np.testing.assert_allclose(th, th_ref, rtol=0, atol=2e-6)
    got = score_pool(pool, text_emb, th, "surplus", block_pool=64, block_anchor=100)
    want, margin = dense_scores(pool, text_emb, th_ref, "surplus")
    np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-5)
    ids = np.arange(500, dtype=np.int64) + 1000
    np.testing.assert_array_equal(select_top(ids, got.scores, got.max_margin, 25).ids,
                                  dense_select(ids, want, margin, 25))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n_u=st.integers(1, 40), budget=st.integers(1, 40), n_shards=st.integers(1, 6),
       weight=st.sampled_from(["surplus", "counting"]), side=st.sampled_from(["image", "text"]))
def test_sharded_selection_equals_dense(seed, n_u, budget, n_shards, weight, side):
    """Thresholds, blocked scores and per-shard top-B merged once == the literal SPEC."""
    rng = np.random.default_rng(seed)
    budget = min(budget, n_u)
    image_ids, image_emb, owner, text_emb = paired_set(rng, int(rng.integers(2, 12)), 3, 3)
    k = int(rng.integers(1, 4))
    pool, pool_ids = quantized(rng, n_u, 3), rng.permutation(10 * n_u)[:n_u].astype(np.int64)
    th_ref = dense_thresholds(text_emb, owner, image_emb, image_ids, k, side)
    anchors = text_emb if side == "image" else image_emb
    want_s, want_m = dense_scores(pool, anchors, th_ref, weight)
    want = dense_select(pool_ids, want_s, want_m, budget)
    th = kernel_thresholds(image_ids, image_emb, owner, text_emb, k, side, 1, rng)
    parts = []
    for rows in np.array_split(rng.permutation(n_u), n_shards):
        res = score_pool(pool[rows], anchors, th, weight, block_pool=int(rng.integers(1, 9)),
                         block_anchor=int(rng.integers(1, 9)))
        parts.append(select_top(pool_ids[rows], res.scores, res.max_margin, budget))
    got = merge_top(parts, budget)
    np.testing.assert_array_equal(got.ids, want)
    by_id = dict(zip(pool_ids.tolist(), want_s.tolist()))
    np.testing.assert_array_equal(got.scores, [by_id[i] for i in want.tolist()])


def test_selection_tie_breaks():
    ids = np.array([9, 3, 5, 7, 1], np.int64)
    scores = np.array([1.0, 1.0, 2.0, 0.0, 0.0])
    margin = np.array([0.5, 0.5, -1.0, 0.3, np.nan], np.float32)
    top = select_top(ids, scores, margin, 5)
    assert top.ids.tolist() == [5, 3, 9, 7, 1]  # score, then max_margin, then smaller id; NaN last
    halves = [select_top(ids[:2], scores[:2], margin[:2], 3), select_top(ids[2:], scores[2:], margin[2:], 3)]
    assert merge_top(halves, 3).ids.tolist() == [5, 3, 9]
    assert isinstance(top, Ranked) and len(top) == 5


def test_random_keys_are_keyed_by_id_and_uniform():
    ids = np.arange(200_000, dtype=np.int64)
    keys = random_keys(ids, 5)
    assert ((0 <= keys) & (keys < 1)).all()
    assert abs(keys.mean() - 0.5) < 0.01 and np.histogram(keys, 10)[0].min() > 19_000
    shuffled = np.random.default_rng(0).permutation(ids)
    np.testing.assert_array_equal(random_keys(shuffled, 5), keys[shuffled])
    assert not np.array_equal(random_keys(ids, 6), keys)


def dense_coreset(pool, centers, budget):
    d = [min([np.sum((p - c) ** 2) for c in centers] or [np.inf]) for p in pool.astype(np.float64)]
    picks = []
    for _ in range(budget):
        i = max(range(len(pool)), key=lambda r: (d[r], -r))
        picks.append(i)
        d = [min(d[r], np.sum((pool[r].astype(np.float64) - pool[i]) ** 2)) for r in range(len(pool))]
    return picks


@pytest.mark.parametrize("seed", range(6))
def test_coreset_matches_dense_greedy(seed):
    rng = np.random.default_rng(300 + seed)
    pool, centers = quantized(rng, 40, 4), quantized(rng, int(rng.integers(1, 6)), 4)
    picked, at_pick, final = coreset_select(pool, centers, 12)
    assert picked.tolist() == dense_coreset(pool, centers, 12)
    assert (np.diff(at_pick) <= 1e-12).all() and final[picked].max() == 0
