"""Oracle tests: the pruned and the fused dense kernels against the dense float64 reference."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import quantized
from hnal_ray.score.pruning import PrunedScores, cluster_anchors, score_pool_dense, score_pool_pruned
from hnal_ray.score.reference import dense_scores, dense_select, dense_thresholds
from hnal_ray.score.scoring import score_pool
from hnal_ray.score.selection import select_top
from hnal_ray.data.synthetic import clustered_embeddings, unit


def clustered_signs(rng, n, n_clusters, d=16, flips=2):
    """Unit vectors of +-1/4 entries (d=16: every dot product is a multiple of 1/16, exact in float32)
    around `n_clusters` random sign patterns, each row with up to `flips` signs flipped."""
    centres = rng.choice(np.array([-1.0, 1.0]), (n_clusters, d))
    x = centres[rng.integers(0, n_clusters, n)]
    for _ in range(flips):
        x[np.arange(n), rng.integers(0, d, n)] *= rng.choice(np.array([-1.0, 1.0]), n)
    return (x / np.sqrt(d)).astype(np.float32)


def paired_world(rng, n_images=60, n_pool=300, n_clusters=6):
    """Images, their captions (multi-caption), a pool, all clustered; thresholds from the reference."""
    emb = clustered_signs(rng, n_images + n_pool, n_clusters)
    image_ids = np.arange(n_images, dtype=np.int64) * 3
    owner = np.repeat(image_ids, rng.integers(1, 4, n_images))
    rows = owner // 3
    text = emb[rows].copy()
    text[np.arange(len(rows)), rng.integers(0, 16, len(rows))] *= -1  # a caption is its image, one sign off
    return image_ids, emb[:n_images], owner, text, emb[n_images:]


def assert_same_as_reference(res, pool, anchors, th, weight):
    want_s, want_m = dense_scores(pool, anchors, th, weight)
    np.testing.assert_array_equal(res.scores, want_s)
    np.testing.assert_array_equal(res.max_margin, want_m.astype(np.float32))


@pytest.mark.parametrize("weight", ["surplus", "counting"])
@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("seed", range(4))
def test_pruned_is_exact_and_skips(weight, side, seed):
    rng = np.random.default_rng(500 + seed)
    image_ids, image_emb, owner, text_emb, pool = paired_world(rng)
    k = int(rng.integers(1, 3))
    th = dense_thresholds(text_emb, owner, image_emb, image_ids, k, side).astype(np.float32)
    anchors = text_emb if side == "image" else image_emb
    skipped = []
    for n_clusters, blocks, dense_above in [(1, (4096, 8192), 1.0), (6, (37, 5), 1.0), (12, (64, 3), 0.5),
                                            (12, (64, 3), 0.0), (500, (300, 1000), 1.0)]:
        res = score_pool_pruned(pool, anchors, th, weight, block_pool=blocks[0], block_anchor=blocks[1],
                                n_clusters=n_clusters, seed=seed, dense_above=dense_above)
        assert isinstance(res, PrunedScores) and res.pairs == len(pool) * len(anchors)
        assert 0 <= res.pairs_computed + res.pairs_margin <= res.pairs
        assert_same_as_reference(res, pool, anchors, th, weight)
        skipped.append(res.skipped)
    assert max(skipped) > 0.3 and skipped[3] == 0.0, skipped  # the bound prunes; dense_above=0: no skip


@pytest.mark.parametrize("weight", ["surplus", "counting"])
def test_pruned_equals_score_pool_and_selection(weight):
    rng = np.random.default_rng(7)
    image_ids, image_emb, owner, text_emb, pool = paired_world(rng, 80, 500, 8)
    th = dense_thresholds(text_emb, owner, image_emb, image_ids, 1, "image").astype(np.float32)
    clusters = cluster_anchors(text_emb, 8, seed=3)
    got = score_pool_pruned(pool, text_emb, th, weight, block_pool=128, clusters=clusters)
    base = score_pool(pool, text_emb, th, weight)
    np.testing.assert_array_equal(got.scores, base.scores)
    np.testing.assert_array_equal(got.max_margin, base.max_margin)
    ids = np.arange(len(pool), dtype=np.int64) * 5 + 1
    want_s, want_m = dense_scores(pool, text_emb, th, weight)
    for budget in (10, 200, 500):  # 500: the whole pool, so the all-zero tail's max_margin order counts
        assert select_top(ids, got.scores, got.max_margin, budget).ids.tolist() == \
            dense_select(ids, want_s, want_m, budget).tolist()


def test_infinite_thresholds_and_degenerate_shapes():
    rng = np.random.default_rng(1)
    pool, anchors = clustered_signs(rng, 40, 3), clustered_signs(rng, 12, 3)
    th = np.full(12, 0.5, np.float32)
    th[0], th[1:4] = -np.inf, np.inf
    for weight in ("surplus", "counting"):
        res = score_pool_pruned(pool, anchors, th, weight, n_clusters=4, block_pool=7)
        assert_same_as_reference(res, pool, anchors, th, weight)
    only_plus = np.full(12, np.inf, np.float32)
    res = score_pool_pruned(pool, anchors, only_plus, "surplus", n_clusters=3)
    assert (res.scores == 0).all() and np.isneginf(res.max_margin).all() and res.skipped == 1.0
    empty = score_pool_pruned(pool[:0], anchors, th, "surplus")
    assert len(empty.scores) == 0 and empty.pairs == 0
    no_anchor = score_pool_pruned(pool, anchors[:0], th[:0], "counting")
    assert (no_anchor.scores == 0).all() and np.isneginf(no_anchor.max_margin).all()
    with pytest.raises(ValueError):
        score_pool_pruned(pool, anchors, th, "hinge")


def test_continuous_unit_vectors_agree_to_float32_rounding():
    rng = np.random.default_rng(3)
    emb, _ = clustered_embeddings(rng, 1500, 32, 10, spread=0.1)
    image_ids = np.arange(300, dtype=np.int64)
    owner = np.repeat(image_ids, 2)
    text = unit(emb[:300][owner // 1] + 0.05 * rng.standard_normal((600, 32)))
    pool = emb[300:]
    th = dense_thresholds(text, owner, emb[:300], image_ids, 1, "image")
    res = score_pool_pruned(pool, text, th.astype(np.float32), "surplus", n_clusters=16, block_pool=256)
    want_s, want_m = dense_scores(pool, text, th, "surplus")
    assert res.skipped > 0.5
    np.testing.assert_allclose(res.scores, want_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.max_margin, want_m, rtol=0, atol=2e-6)
    ids = np.arange(len(pool), dtype=np.int64)
    np.testing.assert_array_equal(select_top(ids, res.scores, res.max_margin, 50).ids,
                                  dense_select(ids, want_s, want_m, 50))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n_u=st.integers(1, 30), n_a=st.integers(1, 30),
       weight=st.sampled_from(["surplus", "counting"]), n_clusters=st.integers(1, 8),
       blocks=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_any_norms_and_blocks_match_dense(seed, n_u, n_a, weight, n_clusters, blocks):
    """Quantized vectors of any norm, thresholds often high: skips happen and the result is exact."""
    rng = np.random.default_rng(seed)
    pool, anchors = quantized(rng, n_u, 4), quantized(rng, n_a, 4)
    th = (rng.integers(-4, 9, n_a) / 4).astype(np.float32)
    got = score_pool_pruned(pool, anchors, th, weight, block_pool=blocks[0], block_anchor=blocks[1],
                            n_clusters=n_clusters, seed=seed % 7)
    assert_same_as_reference(got, pool, anchors, th, weight)


@pytest.mark.parametrize("weight", ["surplus", "counting"])
@pytest.mark.parametrize("blocks", [(1, 1), (3, 5), (2048, 2048)])
def test_fused_dense_matches_reference(weight, blocks):
    rng = np.random.default_rng(11)
    pool, anchors = quantized(rng, 23, 6), quantized(rng, 17, 6)
    th = (rng.integers(-4, 5, 17) / 4).astype(np.float32)
    th[3] = -np.inf
    res = score_pool_dense(pool, anchors, th, weight, block_pool=blocks[0], block_anchor=blocks[1])
    assert_same_as_reference(res, pool, anchors, th, weight)
    np.testing.assert_array_equal(res.scores, score_pool(pool, anchors, th, weight).scores)


@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("weight,strategy,k", [("surplus", "hard-negative", 1), ("counting", "hard-negative", 2),
                                               ("surplus", "coverage", 1), ("counting", "cluster", 1)])
def test_method_pruned_through_hnal_score(tmp_path, side, weight, strategy, k):
    """`hnal score --method pruned` against the dense reference and `--method exact`: on sign vectors
    every float32 sum is exact, so the outputs are equal to the last bit (on other data the scores
    differ by float32 summation order: test_continuous_unit_vectors_agree_to_float32_rounding)."""
    import pyarrow.parquet as pq

    from helpers import dense_run, write_inputs
    from hnal_ray.cli import main

    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(11 + k), n_images=40, n_pool=90, side=side)
    args = ["score", "--paired-images", str(paths["paired_images"]), "--paired-texts", str(paths["paired_texts"]),
            "--pool", str(paths["pool"]), "--budget", "12", "--side", side, "--weight", weight, "--k", str(k),
            "--strategy", strategy, "--shard-rows", "25", "--stream-rows", "9", "--block-anchor", "7"]
    out = {m: tmp_path / m for m in ("exact", "pruned")}
    for method, d in out.items():
        assert main(args + ["--method", method, "--out", str(d)]) == 0
    summary = json.loads((out["pruned"] / "summary.json").read_text())
    assert summary["config"]["method"] == "pruned" and "anchor_kmeans_s" in summary["timings"]
    for name in ("selection.parquet", "scores.parquet"):
        assert pq.read_table(out["pruned"] / name).equals(pq.read_table(out["exact"] / name)), name
    if strategy == "hard-negative":
        want, _ = dense_run(raw, side, weight, k, 12)
        assert pq.read_table(out["pruned"] / "selection.parquet").column(0).to_pylist() == want.tolist()


def test_method_pruned_is_refused_with_low_precision():
    from hnal_ray.config import ConfigError, ScoreConfig

    with pytest.raises(ConfigError, match="--method pruned computes in fp32"):
        ScoreConfig(budget=3, method="pruned", precision="bf16")
