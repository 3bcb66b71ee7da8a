"""Cluster quotas for diverse selection: seeded k-means fitted once on a sample of the pool, exact
assignment of every item, and the one merge step that spreads the budget over the clusters.

Picks are ordered round-robin over clusters: an item's key is its rank within its cluster divided
by the cluster's weight (1 for `equal` quotas, the cluster's pool size for `proportional`), ties
broken by score, max_margin and id as in `select_top`. The top B keys are the selection: with B
clusters and equal quotas that is the best item of every cluster; a cluster with too few items
leaves its share to the others. Quota `uncovered` is TypiClust's rule: the clusters are fitted on
pool and paired items together, and the best item of each cluster holding no paired item comes
first, largest cluster first. Everything is computed per row in float64, so the selection does
not depend on how the pool is sharded.
"""
from __future__ import annotations

import numpy as np

from hnal_ray.config import QUOTAS
from hnal_ray.score.selection import Ranked


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 25) -> np.ndarray:
    """(k, d) float64 centres of the (n, d) rows `x` (given in a fixed order): seeded k-means++
    initialisation, then Lloyd iterations; an empty cluster keeps its centre."""
    x = np.asarray(x, np.float64)
    k = min(k, len(x))
    rng = np.random.default_rng(seed)
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(len(x))]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for i in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
        centres[i] = x[rng.choice(len(x), p=p)]
        d2 = np.minimum(d2, ((x - centres[i]) ** 2).sum(1))
    for _ in range(iters):
        label = assign(x, centres)
        sums = np.zeros_like(centres)
        np.add.at(sums, label, x)
        counts = np.bincount(label, minlength=k)
        moved = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        if np.array_equal(moved, centres):
            break
        centres = moved
    return centres


def assign(emb: np.ndarray, centres: np.ndarray, block: int | None = None) -> np.ndarray:
    """(n,) int64 nearest centre (squared L2, float64, first index among ties) of each row.

    Each distance is an elementwise product summed along d, never a GEMM, so a row's label is
    the same whatever other rows it is computed with (blocks, shards). `block` rows at a time
    (default: at most 512, fewer when k * d is large, so the (block, k, d) product stays ~128 MB)."""
    emb = np.asarray(emb, np.float64)
    if block is None:
        block = max(1, min(512, (1 << 24) // max(1, centres.size)))
    c2 = (centres ** 2).sum(1)
    out = np.empty(len(emb), np.int64)
    for i in range(0, len(emb), block):
        e = emb[i:i + block]
        dots = (e[:, None, :] * centres[None, :, :]).sum(-1)
        out[i:i + block] = np.argmin(c2[None, :] - 2 * dots, axis=1)
    return out


def centrality(emb: np.ndarray, centres: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """(n,) float64 minus the squared L2 distance of each row to its own centre: the most central
    (typical) items of a cluster score highest. Per row, elementwise, like `assign`."""
    diff = np.asarray(emb, np.float64) - centres[cluster]
    return -(diff * diff).sum(1)


def per_cluster_top(ids: np.ndarray, scores: np.ndarray, max_margin: np.ndarray, cluster: np.ndarray,
                    budget: int) -> tuple[Ranked, np.ndarray]:
    """A shard's candidates: the `budget` best items of every cluster (enough for any quota), in
    select_top order within each cluster; returns (candidates, their clusters)."""
    order = _cluster_order(ids, scores, max_margin, cluster)
    rank = _rank_within(cluster[order])
    keep = order[rank < budget]
    return Ranked(ids[keep].astype(np.int64), scores[keep].astype(np.float64),
                  max_margin[keep].astype(np.float32)), cluster[keep]


def covered_clusters(paired_emb: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(k,) bool: the clusters that hold at least one of the (n_p, d) paired (labelled) items, by the
    same exact `assign` as the pool (for quota uncovered)."""
    return np.bincount(assign(paired_emb, centres), minlength=len(centres)) > 0


def quota_select(cand: Ranked, cluster: np.ndarray, sizes: np.ndarray, budget: int, quota: str,
                 hard: np.ndarray | None = None, covered: np.ndarray | None = None) -> Ranked:
    """The global selection from all shards' candidates; `sizes`: (k,) pool items per cluster;
    `hard`: (k,) its hard negatives (items with a positive hard-negative score), for quota hardness;
    `covered`: (k,) bool, whether it holds a paired item, for quota uncovered. The counts are
    integers summed over shards, so the keys do not depend on the sharding."""
    if quota not in QUOTAS:
        raise ValueError(f"quota must be one of {QUOTAS}, got {quota!r}")
    if quota == "uncovered" and covered is None:
        raise ValueError("quota uncovered needs `covered`, the clusters holding a paired item")
    ids, scores, mm = cand.ids, cand.scores, cand.max_margin
    order = _cluster_order(ids, scores, mm, cluster)
    rank = np.empty(len(ids), np.int64)
    rank[order] = _rank_within(cluster[order])
    if quota == "uncovered":  # TypiClust: every cluster's best item, uncovered then largest clusters first
        sizes = np.asarray(sizes, np.int64)
        keys = (cluster, -sizes[cluster], np.asarray(covered, bool)[cluster], rank)
    else:
        counts = {"equal": np.ones(len(sizes)), "proportional": sizes, "hardness": hard}[quota]
        weight = np.maximum(counts, 1).astype(np.float64)
        keys = ((rank + 1) / weight[cluster],)
    mmf = np.where(np.isnan(mm), -np.inf, mm)
    pick = np.lexsort((ids, -mmf, -scores, *keys))[:budget]  # the last key sorts first
    return Ranked(ids[pick], scores[pick], mm[pick])


def _cluster_order(ids, scores, max_margin, cluster) -> np.ndarray:
    mm = np.where(np.isnan(max_margin), -np.inf, max_margin)
    return np.lexsort((ids, -mm, -scores, cluster))


def _rank_within(sorted_cluster: np.ndarray) -> np.ndarray:
    """0-based position of each row within its run of equal cluster labels (input sorted by cluster)."""
    n = len(sorted_cluster)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_cluster)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.arange(n) - run_start
