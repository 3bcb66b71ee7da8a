"""Coverage selection (greedy hard negatives that discount covered anchors) against its definition
written out item by item, sharded with too few candidates, and through `hnal score`."""
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import _unit, write_inputs
from hnal_ray.cli import main
from hnal_ray.score.coverage import SLACK, dense_cover, greedy_cover, shard_candidates, tolerance
from hnal_ray.score.reference import dense_coverage, dense_scores, dense_select, dense_thresholds


def problem(seed, side="image", n_pool=60):
    """Sign-vector embeddings (many exact ties) and their SPEC thresholds."""
    _, raw = write_inputs(Path(tempfile.mkdtemp()), np.random.default_rng(seed), n_pool=n_pool, side=side)
    img, txt, pool = _unit(raw["image_emb"]), _unit(raw["text_emb"]), _unit(raw["pool_emb"])
    th = dense_thresholds(txt, raw["owner"], img, raw["image_ids"], 1, side)
    return raw["pool_ids"], pool, (txt if side == "image" else img), th


def sharded(ids, pool, anchors, th, weight, budget, cuts, m):
    """The driver's loop: shards send m candidates; 4x more until greedy_cover proves every pick."""
    scores, mm = dense_scores(pool, anchors, th, weight)
    while True:
        parts = [shard_candidates(ids[a:b], scores[a:b], mm[a:b].astype(np.float32), lambda r, a=a: pool[a + r],
                                  m, anchors, th, weight) for a, b in zip(cuts[:-1], cuts[1:])]
        sel = greedy_cover(parts, budget, len(anchors), SLACK if weight == "surplus" else 0.0)
        if sel is not None:
            return sel, m
        m *= 4


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weight", ["surplus", "counting"])
@pytest.mark.parametrize("side", ["image", "text"])
def test_coverage_equals_its_definition_for_any_sharding(seed, weight, side):
    ids, pool, anchors, th = problem(seed, side)
    want = dense_coverage(ids, pool, anchors, th, weight, 12, tolerance(anchors.shape[1]))
    scores, mm = dense_scores(pool, anchors, th, weight)
    assert dense_cover(ids, pool, scores, mm, anchors, th, weight, 12).ids.tolist() == want.tolist()
    rng = np.random.default_rng(seed)
    for n_shards in (1, 3, 7):
        cuts = np.r_[0, np.sort(rng.choice(np.arange(1, len(ids)), n_shards - 1, replace=False)), len(ids)]
        for m in (1, 5, 100):
            got, _ = sharded(ids, pool, anchors, th, weight, 12, cuts, m)
            assert got.ids.tolist() == want.tolist(), (n_shards, m)


def test_coverage_is_top1_for_one_pick_and_spreads_over_anchors():
    ids, pool, anchors, th = problem(7)
    tol = tolerance(anchors.shape[1])
    scores, mm = dense_scores(pool, anchors, th, "surplus")
    assert dense_coverage(ids, pool, anchors, th, "surplus", 1, tol).tolist() == dense_select(ids, scores, mm, 1).tolist()
    picks = dense_coverage(ids, pool, anchors, th, "surplus", 10, tol)
    plain = dense_select(ids, scores, mm, 10)
    beaten = lambda sel: (pool[np.isin(ids, sel)] @ anchors.T - th > 0).any(axis=0).sum()
    assert beaten(picks) >= beaten(plain)   # greedy covers at least as many anchors as the plain top 10
    # a budget past the pool takes every item once
    assert sorted(dense_coverage(ids, pool, anchors, th, "counting", 100, tol).tolist()) == sorted(ids.tolist())


@pytest.mark.parametrize("weight", ["surplus", "counting"])
def test_margins_at_exactly_zero_never_break_the_proof(weight):
    """Pool items that duplicate the paired images (continuous vectors): margins of 0 up to
    rounding at every Top-1 threshold they set. A held-back duplicate must not out-gain a proved pick."""
    rng = np.random.default_rng(5)
    img = _unit(rng.standard_normal((40, 24)))
    owner = np.repeat(np.arange(40), 2)
    txt = _unit(img[owner] + 0.6 * rng.standard_normal((80, 24)))
    pool = np.concatenate([img[:30], _unit(rng.standard_normal((30, 24)))]).astype(np.float32)
    ids = np.arange(1000, 1060)
    th = dense_thresholds(txt, owner, img, np.arange(40), 1, "image")
    want = dense_coverage(ids, pool, txt, th, weight, 15, tolerance(24))
    for m in (1, 2, 60):
        got, _ = sharded(ids, pool, txt, th, weight, 15, np.array([0, 13, 29, 41, 60]), m)
        assert got.ids.tolist() == want.tolist(), m
    # and through `hnal score`, whose scores come from the float32 kernel
    import pyarrow as pa

    from hnal_ray.io import embedding_array

    root = Path(tempfile.mkdtemp())
    pq.write_table(pa.table({"image_id": np.arange(40), "embedding": embedding_array(img)}), root / "pi.parquet")
    pq.write_table(pa.table({"text_id": np.arange(80), "image_id": owner, "embedding": embedding_array(txt)}),
                   root / "pt.parquet")
    pq.write_table(pa.table({"image_id": ids, "embedding": embedding_array(pool)}), root / "u.parquet",
                   row_group_size=5)
    args = ["score", "--paired-images", str(root / "pi.parquet"), "--paired-texts", str(root / "pt.parquet"),
            "--pool", str(root / "u.parquet"), "--budget", "15", "--strategy", "coverage", "--weight", weight]
    for extra in ([], ["--candidates", "1", "--shard-rows", "10"]):
        assert main(args + ["--out", str(root / f"o{len(extra)}")] + extra) == 0
        assert pq.read_table(root / f"o{len(extra)}" / "selection.parquet")["image_id"].to_pylist() == want.tolist()


@pytest.mark.parametrize("side", ["image", "text"])
def test_hnal_score_coverage_asks_for_more_candidates_and_stays_exact(tmp_path, side):
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(3), n_pool=60, side=side)
    img, txt, pool = _unit(raw["image_emb"]), _unit(raw["text_emb"]), _unit(raw["pool_emb"])
    th = dense_thresholds(txt, raw["owner"], img, raw["image_ids"], 1, side)
    anchors = txt if side == "image" else img
    want = dense_coverage(raw["pool_ids"], pool, anchors, th, "surplus", 9, tolerance(anchors.shape[1]))
    args = ["score", "--paired-images", str(paths["paired_images"]), "--paired-texts", str(paths["paired_texts"]),
            "--pool", str(paths["pool"]), "--budget", "9", "--strategy", "coverage", "--side", side]
    for extra in ([], ["--candidates", "1", "--shard-rows", "7", "--stream-rows", "3"]):
        out = tmp_path / f"out{len(extra)}"
        assert main(args + ["--out", str(out)] + extra) == 0
        id_col = "image_id" if side == "image" else "text_id"
        assert pq.read_table(out / "selection.parquet")[id_col].to_pylist() == want.tolist()
        summary = json.loads((out / "summary.json").read_text())
        if extra:  # 1 candidate per shard cannot prove 9 picks: the shards were asked again
            assert summary["timings"]["candidates_per_shard"] > 1 and len(summary["shards"]) == 9
