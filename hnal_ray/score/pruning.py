"""Exact scoring that skips (pool item, anchor cluster) products a bound proves add nothing.

For an anchor t of cluster c (centre c), s(u, t) = u.c + u.(t - c) <= u.c + ||u|| r_t with
r_t = ||t - c||, so every margin of u against cluster c is at most
    bound(u, c) = u.c + max_t (||u|| r_t - xi_t)   (+ a float32 rounding allowance).
A cluster whose bound is <= 0 holds no hard negative for u: its product is skipped and the
Surplus/Counting score is unchanged. The bound also caps the skipped margins, so max_margin stays
exact: an item whose computed margins are all <= 0 visits the skipped clusters in decreasing bound
order until the next bound cannot beat its best margin (branch and bound; usually one cluster).
`score_pool_dense` (hnal_ray.score.scoring.score_pool) is the same block kernel with no skipping.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from hnal_ray.score.scoring import PoolScores, check_weight, similarity_into, as_float32_tensor, block_weights
from hnal_ray.score.scoring import score_pool as score_pool_dense  # the exact dense path, no skipping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnchorClusters:
    """k-means over the anchors. centres: (C, d) float32; labels: (n_a,) int64 in [0, C)."""

    centres: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class PrunedScores(PoolScores):
    """PoolScores (pairs = all n_u * n_a pairs accounted for) plus the products actually done:
    pairs_computed for the scores, pairs_margin only to make max_margin exact."""

    pairs_computed: int = 0
    pairs_margin: int = 0

    @property
    def skipped(self) -> float:
        """Fraction of pairs whose product was never computed."""
        return 1.0 - (self.pairs_computed + self.pairs_margin) / max(self.pairs, 1)


def cluster_anchors(anchor_emb: np.ndarray, n_clusters: int, seed: int = 0, niter: int = 20) -> AnchorClusters:
    """Seeded FAISS k-means of anchor_emb (n_a, d) into min(n_clusters, n_a) clusters; compute once per round."""
    from hnal_ray.score.kmeans import cluster_labels

    centres, labels = cluster_labels(np.ascontiguousarray(anchor_emb, dtype=np.float32), max(1, n_clusters), seed, niter)
    return AnchorClusters(centres.astype(np.float32), labels)


def score_pool_pruned(pool_emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str,
                      device: torch.device | None = None, block_pool: int = 8192, block_anchor: int = 1024,
                      n_clusters: int = 256, seed: int = 0, clusters: AnchorClusters | None = None,
                      dense_above: float = 0.5) -> PrunedScores:
    """hnal_ray.score.scoring.score_pool with the bound above: same scores and max_margin, fewer products.

    pool_emb: (n_u, d) float32 (L2-normalised; any norms are handled, looser); anchor_emb: (n_a, d)
    float32; thresholds: (n_a,) float32, +-inf allowed. `clusters` (from cluster_anchors) is reused
    across calls; otherwise n_clusters are fitted here with `seed`. A pool block whose bounds leave
    more than `dense_above` of its pairs to compute is scored densely instead (cluster-sized GEMMs
    are slower than the dense kernel's, and every margin is then computed anyway). Work memory is set
    by the blocks: (block_pool, block_anchor) floats plus (block_pool, C) bounds.
    """
    check_weight(weight)
    device = device or torch.device("cpu")
    n_u, n_a = len(pool_emb), len(anchor_emb)
    scores, max_margin = np.zeros(n_u), np.full(n_u, -np.inf, np.float32)
    if n_u == 0 or n_a == 0:
        return PrunedScores(scores, max_margin, 0)
    table = _ClusterTable(anchor_emb, thresholds, clusters or cluster_anchors(anchor_emb, n_clusters, seed),
                          block_anchor, device)
    pool, done = as_float32_tensor(pool_emb), [0, 0]
    buf = torch.empty(min(block_pool, n_u) * min(block_anchor, n_a), device=device)
    with torch.inference_mode():
        for u0 in range(0, n_u, block_pool):
            p = pool[u0:u0 + block_pool].to(device, non_blocking=True)
            acc, mm = table.score_block(p, weight, buf, done, dense_above)
            scores[u0:u0 + len(p)], max_margin[u0:u0 + len(p)] = acc.cpu().numpy(), mm.cpu().numpy()
    res = PrunedScores(scores, max_margin, n_u * n_a, done[0], done[1])
    log.info("pruned scoring: %d x %d pairs, %.1f%% skipped (%d for max_margin only)", n_u, n_a,
             100 * res.skipped, done[1])
    return res


class _ClusterTable:
    """Anchors sorted by cluster, cut into slabs of <= block_anchor rows, with each cluster's reach."""

    def __init__(self, anchor_emb, thresholds, clusters: AnchorClusters, block_anchor: int, device):
        order = np.argsort(clusters.labels, kind="stable")
        labels, emb = clusters.labels[order], np.asarray(anchor_emb, np.float32)[order]
        self.xi_np = np.asarray(thresholds, np.float64)[order]
        present = np.unique(labels)  # clusters with members; empty ones are dropped
        self.starts = np.searchsorted(labels, np.append(present, present[-1] + 1))
        centres = clusters.centres[present].astype(np.float32).astype(np.float64)  # the c of u.c
        self.radius = np.linalg.norm(emb - centres[np.searchsorted(present, labels)], axis=1)
        self.slabs = [[(a0, min(a0 + block_anchor, e)) for a0 in range(s, e, block_anchor)]
                      for s, e in zip(self.starts[:-1], self.starts[1:])]
        self.dense = [(a0, min(a0 + block_anchor, len(emb))) for a0 in range(0, len(emb), block_anchor)]
        self.sizes = torch.as_tensor(np.diff(self.starts), dtype=torch.float64, device=device)
        self.anchors, self.xi = as_float32_tensor(emb).to(device), as_float32_tensor(self.xi_np).to(device)
        self.centres = as_float32_tensor(centres).to(device)
        finite = np.abs(self.xi_np[np.isfinite(self.xi_np)])
        self.norms = (float(np.linalg.norm(centres, axis=1).max()), float(np.linalg.norm(emb, axis=1).max()),
                      float(finite.max()) if len(finite) else 0.0, emb.shape[1])

    def bounds(self, p: torch.Tensor) -> torch.Tensor:
        """(m, C) float64: no computed float32 margin of row u against cluster c exceeds [u, c]."""
        a = float(torch.linalg.vector_norm(p.double(), dim=1).max()) * (1 + 1e-12)
        reach = np.maximum.reduceat(a * self.radius - self.xi_np, self.starts[:-1])
        c_max, t_max, xi_max, d = self.norms
        unit = _unit_roundoff(p.device)
        n = (d + 2) * unit  # dot products of length d in any order, then one subtraction (Higham 3.5)
        gamma = n / (1 - n) if n < 1 else np.inf
        reach = reach + (gamma * a * (c_max + t_max) + 2 * unit * (a * t_max + xi_max) + 1e-12)
        reach[np.isnan(reach)] = -np.inf  # +inf thresholds everywhere: no margin above -inf
        return (p @ self.centres.T).double() + torch.as_tensor(reach, device=p.device)

    def score_block(self, p, weight, buf, done, dense_above):
        """Scores and exact max margins (m,) of one pool block; adds products done to `done`."""
        bound = self.bounds(p)
        hit = bound > 0
        acc = torch.zeros(len(p), dtype=torch.float64, device=p.device)
        mm = torch.full((len(p),), -torch.inf, device=p.device)
        if float(hit.double().sum(dim=0) @ self.sizes) > dense_above * len(p) * len(self.xi):
            for a0, a1 in self.dense:  # little to skip: all margins, so max_margin is exact as well
                top, total = block_weights(similarity_into(p, self.anchors[a0:a1], buf).sub_(self.xi[a0:a1]), weight)
                mm, acc = torch.maximum(mm, top), acc + total
            done[0] += len(p) * len(self.xi)
            return acc, mm
        for c, slabs in enumerate(self.slabs):
            rows = hit[:, c].nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            sub = p if len(rows) == len(p) else p.index_select(0, rows)
            for a0, a1 in slabs:
                top, total = block_weights(similarity_into(sub, self.anchors[a0:a1], buf).sub_(self.xi[a0:a1]), weight)
                acc.index_add_(0, rows, total)
                mm[rows] = torch.maximum(mm[rows], top)
                done[0] += len(rows) * (a1 - a0)
        self._complete_margins(p, bound.masked_fill(hit, -torch.inf), mm, buf, done)
        return acc, mm

    def _complete_margins(self, p, open_bound, mm, buf, done) -> None:
        """Exact max margin for rows with no positive margin: branch and bound over skipped clusters."""
        need = (mm <= 0).nonzero().squeeze(1)
        cand = open_bound[need]
        while len(need):
            best, c = cand.max(dim=1)
            go = (best > mm[need].double()).nonzero().squeeze(1)
            need, c, cand = need[go], c[go], cand[go]
            for cc in torch.unique(c).tolist():
                sel = (c == cc).nonzero().squeeze(1)
                rows, sub = need[sel], p.index_select(0, need[sel])
                for a0, a1 in self.slabs[cc]:
                    top = similarity_into(sub, self.anchors[a0:a1], buf).sub_(self.xi[a0:a1]).amax(dim=1)
                    mm[rows] = torch.maximum(mm[rows], top)
                    done[1] += len(rows) * (a1 - a0)
                cand[sel, cc] = -torch.inf


def _unit_roundoff(device: torch.device) -> float:
    """Unit roundoff of float32 matmuls as configured (TF32/bf16 modes round much more coarsely)."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return 2.0 ** -24 if torch.get_float32_matmul_precision() == "highest" and not tf32 else 2.0 ** -8
