"""Cluster quotas for diverse selection: the merge that spreads the budget over the
clusters of `hnal_ray.score.kmeans`, and TypiClust's typicality within a cluster.

Picks are ordered round-robin over clusters: an item's key is its rank within its cluster divided
by the cluster's weight (1 for `equal` quotas, the cluster's pool size for `proportional`), ties
broken by score, max_margin and id as in `select_top`. The top B keys are the selection: with B
clusters and equal quotas that is the best item of every cluster; a cluster with too few items
leaves its share to the others. Quota `uncovered` is TypiClust's rule: the clusters are fitted on
pool and paired items together and visited in turn, fewest paired items first, then largest
(pool and paired items) first; clusters of at most `min_size` items come after all others.
Everything is computed per row in float64, so the selection does not depend on how the pool is
sharded.
"""
from __future__ import annotations

import numpy as np

from hnal_ray.config import QUOTAS
from hnal_ray.score.selection import Ranked


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


def quota_select(cand: Ranked, cluster: np.ndarray, sizes: np.ndarray, budget: int, quota: str,
                 hard: np.ndarray | None = None, paired: np.ndarray | None = None, min_size: int = 0,
                 rank: np.ndarray | None = None) -> Ranked:
    """The global selection from all shards' candidates; `sizes`: (k,) pool items per cluster;
    `hard`: (k,) its hard negatives (items with a positive hard-negative score), for quota hardness;
    `paired`: (k,) its paired items, for quota uncovered; `rank`: each candidate's place within its
    cluster when the caller ordered them (typicality picks), else by score. The counts are
    integers summed over shards, so the keys do not depend on the sharding."""
    if quota not in QUOTAS:
        raise ValueError(f"quota must be one of {QUOTAS}, got {quota!r}")
    if quota == "uncovered" and paired is None:
        raise ValueError("quota uncovered needs `paired`, the paired items of each cluster")
    ids, scores, mm = cand.ids, cand.scores, cand.max_margin
    if rank is None:
        order = _cluster_order(ids, scores, mm, cluster)
        rank = np.empty(len(ids), np.int64)
        rank[order] = _rank_within(cluster[order])
    if quota == "uncovered":
        keys = (cluster,) + visit_keys(np.asarray(sizes, np.int64), np.asarray(paired, np.int64), min_size,
                                       cluster, rank)
    else:
        counts = {"equal": np.ones(len(sizes)), "proportional": sizes, "hardness": hard}[quota]
        weight = np.maximum(counts, 1).astype(np.float64)
        keys = ((rank + 1) / weight[cluster],)
    mmf = np.where(np.isnan(mm), -np.inf, mm)
    pick = np.lexsort((ids, -mmf, -scores, *keys))[:budget]  # the last key sorts first
    return Ranked(ids[pick], scores[pick], mm[pick])


def visit_keys(sizes: np.ndarray, paired: np.ndarray, min_size: int, cluster: np.ndarray,
               rank: np.ndarray) -> tuple:
    """np.lexsort keys (last sorts first) of TypiClust's visiting order for items at `rank` in
    `cluster`: clusters larger than `min_size` before the rest; then round by round (rank), and
    within a round fewest paired items first, then largest (pool + paired) first, then index."""
    total = sizes + paired
    return (-total[cluster], paired[cluster], rank, total[cluster] <= min_size)


def visit_plan(sizes: np.ndarray, paired: np.ndarray, min_size: int, budget: int) -> np.ndarray:
    """(k,) int64: how many of the first `budget` visits of TypiClust's order fall on each cluster,
    given its `sizes` pool items (a cluster is passed over once they are all taken)."""
    sizes = np.asarray(sizes, np.int64)
    take = np.minimum(sizes, budget)
    cluster = np.repeat(np.arange(len(sizes)), take)
    rank = np.arange(len(cluster)) - np.repeat(np.cumsum(take) - take, take)
    first = np.lexsort((cluster,) + visit_keys(sizes, np.asarray(paired, np.int64), min_size, cluster, rank))
    return np.bincount(cluster[first[:budget]], minlength=len(sizes))


def typical_picks(ids: np.ndarray, emb: np.ndarray, picks: int, neighbours: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """TypiClust's picks from one cluster: (positions (q,), typicality (q,) float64), q = min(picks, n).

    ids: (n,) int64 sorted; emb: (n, d) the cluster's items (its reference set). Typicality is
    1 / (mean squared L2 distance to the min(neighbours, n // 2) nearest other items + 1e-5), as
    the reference implementation computes it; the most typical item is taken (smallest id among
    ties), removed, and typicality recomputed over the rest for the next pick. Float64 throughout,
    so the picks depend on the reference set only, not on where it is computed."""
    x = np.asarray(emb, np.float64)
    n = len(x)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * (x @ x.T), 0)
    np.fill_diagonal(d2, np.inf)
    alive = np.ones(n, bool)
    out, typ = [], []
    for _ in range(min(picks, n)):
        rows = np.flatnonzero(alive)
        m = min(neighbours, len(rows) // 2)
        if m == 0:  # one item left: TypiClust's mean over no neighbour; it is the only choice
            t = np.full(len(rows), np.inf)
        else:
            sub = d2[np.ix_(rows, rows)]
            near = np.partition(sub, m - 1, axis=1)[:, :m]
            t = 1.0 / (near.mean(1) + 1e-5)
        best = int(np.argmax(t))          # first maximum: the smallest id (rows are in id order)
        out.append(rows[best]), typ.append(t[best])
        alive[rows[best]] = False
    return np.array(out, np.int64), np.array(typ, np.float64)


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
