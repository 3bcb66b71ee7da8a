"""Approximate scoring for huge pools: each pool item is scored against its top-M anchors by margin only.

The margin is an inner product in d + 1 dimensions, s(u, t) - xi_t = [u, 1] . [t, -xi_t], so the
anchors that can give u a positive weight are its maximum-inner-product neighbours. A FAISS IVF
index over the augmented anchors finds the top-M of them (probing `nprobe` of `nlist` lists); the
score sums the positive margins among those M. It misses an anchor when the IVF probe does or when
u has more than M hard anchors, so it is not exact: the benchmark reports its recall of the exact
selection. Anchors with a -inf threshold are hard for every item and are added exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from hnal_ray.score.scoring import WEIGHTS, PoolScores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MarginIndex:
    """IVF index over [t, -xi_t] of the anchors with a finite threshold; `always` counts -inf ones."""

    index: object
    always: int
    nlist: int


def default_nlist(n_anchors: int) -> int:
    """About 4 sqrt(n) lists, at least one, at most one per 8 anchors."""
    return max(1, min(int(4 * math.sqrt(n_anchors)), n_anchors // 8))


def build_margin_index(anchor_emb: np.ndarray, thresholds: np.ndarray, nlist: int | None = None,
                       seed: int = 0) -> MarginIndex:
    """Train (seeded k-means) and fill the IVF index, once per round; +inf thresholds can never be
    exceeded and are left out. anchor_emb: (n_a, d) float32; thresholds: (n_a,)."""
    import faiss

    xi = np.asarray(thresholds, np.float32)
    keep = np.isfinite(xi)
    aug = np.ascontiguousarray(np.hstack([anchor_emb[keep], -xi[keep, None]]), dtype=np.float32)
    nlist = max(1, min(nlist or default_nlist(len(aug)), len(aug)))
    quantizer = faiss.IndexFlatIP(aug.shape[1])
    index = faiss.IndexIVFFlat(quantizer, aug.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.min_points_per_centroid = seed, 1
    if len(aug):
        index.train(aug)
        index.add(aug)
    index.quantizer_trains_alone = 0
    return MarginIndex(index, int(np.isneginf(xi).sum()), nlist)


def score_pool_approx(pool_emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str,
                      top_m: int = 64, nprobe: int = 8, nlist: int | None = None, seed: int = 0,
                      index: MarginIndex | None = None, block_pool: int = 65536) -> PoolScores:
    """Approximate PoolScores: weights summed over each item's top-M anchors by margin.
    pool_emb: (n_u, d) float32; anchor_emb: (n_a, d); thresholds: (n_a,) float32, +-inf allowed.
    max_margin is the best margin found (exact when the true best anchor is among those probed).
    `pairs` counts the (item, anchor) margins the search computed, not n_u * n_a."""
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    index = index or build_margin_index(anchor_emb, thresholds, nlist, seed)
    ivf, n_u = index.index, len(pool_emb)
    scores, max_margin = np.zeros(n_u), np.full(n_u, -np.inf, np.float32)
    ivf.nprobe = min(nprobe, index.nlist)
    m = min(top_m, ivf.ntotal)
    for u0 in range(0, n_u if m else 0, block_pool):
        rows = slice(u0, u0 + block_pool)
        query = np.hstack([pool_emb[rows], np.ones((len(pool_emb[rows]), 1), np.float32)])
        margin, label = ivf.search(np.ascontiguousarray(query, dtype=np.float32), m)
        margin = np.where(label >= 0, margin, -np.inf).astype(np.float32)
        w = np.maximum(margin, 0) if weight == "surplus" else (margin > 0)
        scores[rows] = w.sum(axis=1, dtype=np.float64)
        max_margin[rows] = margin.max(axis=1)
    if index.always:
        scores += np.inf if weight == "surplus" else index.always
        max_margin[:] = np.inf
    probed = ivf.nprobe / max(index.nlist, 1) * ivf.ntotal
    log.info("approx scoring: %d items, top-%d of ~%.0f probed anchors each", n_u, m, probed)
    return PoolScores(scores, max_margin, int(n_u * probed))
