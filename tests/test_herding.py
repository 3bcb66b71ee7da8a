"""ProbCover and MaxHerding (greedy generalized coverage) against their definitions written out with
the full float64 kernel matrix: the bounds, the sharded greedy with too few candidates, the kernel
scales, and `hnal score` in process (Ray actors: tests/test_ray_score.py)."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import _unit, write_inputs
from hnal_ray.cli import main
from hnal_ray.score import herding
from hnal_ray.score.kmeans import cluster_labels
from hnal_ray.score.reference import dense_generalized_coverage, dense_purity_radius

CPU = torch.device("cpu")
KERNELS = [herding.Kernel("ball", 0.9), herding.Kernel("ball", 1.2), herding.Kernel("gauss", 0.4),
           herding.Kernel("gauss", 1.0)]


def blobs(seed, n=120, d=8, centres=5, dupes=10):
    """Unit rows around a few centres, with exact duplicate rows (ties in every gain)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, d))
    x[:dupes] = x[dupes:2 * dupes]
    return _unit(x)


def sharded(ids, x, support, covered, kernel, budget, seed, cuts, m):
    """The driver's loop: each shard sends m candidates; 4x more until every pick is proved."""
    bounds = herding.gain_bounds(x.astype(np.float32), support, covered, kernel, CPU, 16, 32)
    tie = herding.order_key(ids, seed)
    while True:
        parts = [herding.shard_candidates(ids[a:b], bounds[a:b], tie[a:b], lambda r, a=a: x[a + r], m, support,
                                          covered, kernel) for a, b in zip(cuts[:-1], cuts[1:])]
        sel = herding.greedy_herd(parts, budget, covered)
        if sel is not None:
            return sel, m
        m *= 4


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k.kind}-{k.scale}")
def test_greedy_equals_the_definition_for_any_sharding(seed, kernel):
    x = blobs(seed)
    ids = np.random.default_rng(seed).permutation(np.arange(5000, 5000 + 3 * len(x)))[:len(x)]
    paired = blobs(seed + 100, n=15, dupes=0)
    support = np.concatenate([x, paired])
    covered = herding.coverage_of(support, paired, kernel)
    want = dense_generalized_coverage(ids, x, support, paired, kernel.of, 25,
                                      herding.order_key(ids, seed).astype(np.float64))
    for cuts, m in (([0, len(x)], 1000), ([0, len(x)], 1), ([0, 7, 50, 51, len(x)], 2), ([0, 60, len(x)], 5)):
        sel, used = sharded(ids, x, support, covered, kernel, 25, seed, cuts, m)
        assert sel.ids.tolist() == want, (cuts, m)
        if m == 1:
            assert used > 1  # one candidate cannot prove 25 picks: the shards were asked again


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k.kind}-{k.scale}")
def test_float32_bounds_never_undercount_the_first_gain(kernel):
    """ub(x) >= sum_u max(0, k(u, x) - c_u) in float64, also for rows at exactly the ball's radius."""
    x = blobs(4, n=200)
    support = x[::2].copy()
    if kernel.kind == "ball":  # rows at distance exactly delta from a support row
        kernel = herding.Kernel("ball", float(np.sqrt(((x[1] - support[0]) ** 2).sum())))
    covered = herding.coverage_of(support, x[:5], kernel)
    k = kernel.of(((x[:, None] - support[None]) ** 2).sum(-1))
    exact = np.maximum(k - covered, 0).sum(1)
    ub = herding.gain_bounds(x.astype(np.float32), support, covered, kernel, CPU, 33, 17)
    assert (ub >= exact).all()
    assert np.allclose(ub, exact, rtol=1e-3, atol=3.0 if kernel.kind == "ball" else 1e-2)  # a bound, not a guess


def test_known_answer_ball_picks_the_densest_ball_first_then_the_uncovered_blob():
    """1-D points: a blob of 5, a blob of 3, one far point; delta 1.5. The first pick covers the 5,
    the second the 3, then the lone point; then all is covered and the rest is a seeded random order."""
    pts = np.array([0, 0.5, 1.0, 1.5, 2.0, 10, 11, 12, 30.0])
    x = np.stack([pts, np.zeros_like(pts)], 1)
    ids = np.arange(len(pts)) + 100
    sel = herding.dense_herd(ids, x, x, np.zeros(len(x)), herding.Kernel("ball", 1.5), len(pts), seed=3)
    assert sel.ids[:3].tolist() == [102, 106, 108] and sel.scores[:3].tolist() == [5.0, 3.0, 1.0]
    assert sel.scores[3:].tolist() == [0.0] * 6
    rest = ids[~np.isin(ids, [102, 106, 108])]
    assert sel.ids[3:].tolist() == rest[np.argsort(-herding.order_key(rest, 3), kind="stable")].tolist()


def test_paired_items_cover_their_neighbourhood():
    """An item next to a paired one gains nothing from what the paired one already covers."""
    x = np.array([[0.0, 0], [0.1, 0], [5, 0], [5.1, 0]])
    ids = np.array([1, 2, 3, 4])
    kernel = herding.Kernel("ball", 0.5)
    covered = herding.coverage_of(x, x[:1], kernel)  # item 1 is already paired
    sel = herding.dense_herd(ids, x, x, covered, kernel, 1, seed=0)
    assert sel.ids[0] in (3, 4) and sel.scores[0] == 2.0


@pytest.mark.parametrize("purity", [0.5, 0.9, 0.95, 1.0])
def test_purity_radius_equals_brute_force(purity):
    x = blobs(5, n=150).astype(np.float32)
    labels = cluster_labels(x, 6, seed=0)[1]
    got = herding.purity_radius(x, labels, purity, CPU)
    want = dense_purity_radius(x, labels, purity)
    assert got == pytest.approx(want, rel=1e-5)
    assert herding.purity_radius(x, np.zeros(len(x), np.int64), purity, CPU) == np.inf  # one cluster


def test_knn_bandwidth_equals_brute_force():
    x = blobs(6, n=90, dupes=0).astype(np.float32)
    d = np.sqrt(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
    want = np.median(np.sort(d, axis=1)[:, 20])  # column 0 is the row itself
    assert herding.knn_bandwidth(x, CPU) == pytest.approx(want, rel=1e-5)


def _run(paths, out, strategy, *extra, budget=9):
    args = ["score", "--paired-images", str(paths["paired_images"]), "--paired-texts", str(paths["paired_texts"]),
            "--pool", str(paths["pool"]), "--budget", str(budget), "--strategy", strategy, "--out", str(out)]
    assert main(args + [str(e) for e in extra]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("strategy", ["probcover", "maxherding"])
@pytest.mark.parametrize("side", ["image", "text"])
def test_hnal_score_equals_the_definition_and_ignores_the_cut(tmp_path, strategy, side):
    """Through the command line: the picks of the float64 definition over pool + paired items, for one
    shard and for 9 shards with one candidate each (asked again until proved); a support sample
    smaller than the data changes the kernel's inputs but not the exactness."""
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(8), n_pool=60, side=side)
    pool = _unit(raw["pool_emb"])
    paired = _unit(raw["image_emb"] if side == "image" else raw["text_emb"])
    paired_ids = raw["image_ids"] if side == "image" else raw["text_ids"]
    id_col = "image_id" if side == "image" else "text_id"
    first = None
    for extra in ([], ["--candidates", 1, "--shard-rows", 7, "--stream-rows", 3]):
        summary = _run(paths, tmp_path / f"out{len(extra)}", strategy, "--side", side, *extra)
        got = pq.read_table(tmp_path / f"out{len(extra)}" / "selection.parquet")[id_col].to_pylist()
        info = summary[strategy]
        kernel = herding.Kernel(info["kernel"], info["scale"])
        order = np.argsort(raw["pool_ids"])
        support = np.concatenate([pool[order], paired[np.argsort(paired_ids)]])
        want = dense_generalized_coverage(raw["pool_ids"], pool, support, paired, kernel.of, 9,
                                          herding.order_key(raw["pool_ids"], 0).astype(np.float64))
        assert got == want and info["support"] == len(pool) + len(paired)
        first = first or got
        assert got == first
        if extra:
            assert summary["timings"]["candidates_per_shard"] > 1 and len(summary["shards"]) == 9
    if strategy == "probcover":  # the radius is the brute-force purity radius of the support's k-means
        x = support.astype(np.float32)
        labels = cluster_labels(x, len(paired) + 9, seed=0)[1]
        assert info["scale"] == pytest.approx(dense_purity_radius(x, labels, 0.95), rel=1e-5)
    summary = _run(paths, tmp_path / "sample", strategy, "--side", side, "--support", 40)
    assert 20 < summary[strategy]["support"] < 60  # a seeded per-row sample of about 40 of 90 items


def test_options_are_checked(tmp_path):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(8), n_pool=20)
    for bad, msg in ((["--purity", "0"], "--purity"), (["--bandwidth", "-1"], "--bandwidth"), (["--support", "0"], "--support")):
        args = ["score", "--paired-images", str(paths["paired_images"]), "--paired-texts", str(paths["paired_texts"]),
                "--pool", str(paths["pool"]), "--budget", "3", "--strategy", "maxherding", "--out", str(tmp_path / "o")]
        assert main(args + bad) == 2
