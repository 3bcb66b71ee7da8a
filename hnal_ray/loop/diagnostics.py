"""What a round's selection looks like, whatever strategy made it: spread over clusters and
groups, redundancy, how many paired anchors each pick beats, and near-duplicates of paired items.

Pure functions over arrays; the driver calls `selection_diagnostics` after each selection and
keeps the result in the round's state, and the report averages it per strategy.
"""
from __future__ import annotations

import numpy as np

from hnal_ray.score.thresholds import kth, negative_topk

NEAR_DUPLICATE = 0.95  # frozen-feature cosine at or above which a pick counts as a copy of a paired item


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    """Mean cosine over distinct pairs of (n, d) unit rows (0 for fewer than 2 rows)."""
    n = len(emb)
    if n < 2:
        return 0.0
    s = np.asarray(emb, np.float64).sum(0)
    return float((s @ s - n) / (n * (n - 1)))


def hard_counts(pool_emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(n_u, n_a) bool: pool item u beats anchor j (s(u, j) > xi_j, the SPEC's hard-negative test)."""
    return (np.asarray(pool_emb, np.float32) @ np.asarray(anchor_emb, np.float32).T) > thresholds[None, :]


def histogram(labels: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(labels, minlength=n)[:n]


def selection_diagnostics(*, selected: np.ndarray, pool_ids: np.ndarray, pool_emb: np.ndarray,
                          anchor_emb: np.ndarray, anchor_group: np.ndarray, key_emb: np.ndarray,
                          key_group: np.ndarray, pool_frozen: np.ndarray, paired_frozen: np.ndarray,
                          pool_cluster: np.ndarray, n_clusters: int, pool_group: np.ndarray | None,
                          seed: int) -> dict:
    """Diagnostics of one selection.

    selected: (B,) ids among pool_ids (n_u,); pool_emb: (n_u, d) model embeddings; anchors/keys as
    in `hnal score` (paired texts/images on the image side); pool_frozen (n_u, D), paired_frozen
    (n_p, D): frozen unit features; pool_cluster: (n_u,) k-means cluster of each pool item's frozen
    features; pool_group: (n_u,) the data set's group labels or None.
    """
    row = np.searchsorted(pool_ids, selected)
    rng = np.random.default_rng(seed)
    control = rng.choice(len(pool_ids), len(row), replace=False)
    xi = kth(negative_topk(anchor_emb, anchor_group, key_emb, key_group, 1), 1)
    beats = hard_counts(pool_emb[row], anchor_emb, xi)
    sel_hist = histogram(pool_cluster[row], n_clusters)
    out = {
        "selected": int(len(row)),
        "redundancy": mean_pairwise_cosine(pool_emb[row]),
        "redundancy_random": mean_pairwise_cosine(pool_emb[control]),
        "anchors_beaten_per_item": float(beats.sum(1).mean()) if len(row) else 0.0,
        "anchors_covered": int(beats.any(0).sum()),
        "anchors": int(len(anchor_emb)),
        "clusters_hit": int((sel_hist > 0).sum()),
        "clusters_hit_random": int((histogram(pool_cluster[control], n_clusters) > 0).sum()),
        "cluster_max_share": float(sel_hist.max() / max(len(row), 1)),
        "cluster_hist": sel_hist.tolist(),
        "pool_cluster_hist": histogram(pool_cluster, n_clusters).tolist(),
    }
    if len(paired_frozen):
        nearest = (np.asarray(pool_frozen[row], np.float32) @ np.asarray(paired_frozen, np.float32).T).max(1)
        out["near_duplicates"] = float((nearest >= NEAR_DUPLICATE).mean()) if len(row) else 0.0
    if pool_group is not None:
        groups, counts = np.unique(pool_group[row], return_counts=True)
        top = np.argsort(-counts, kind="stable")[:5]
        out["groups_hit"] = int(len(groups))
        out["groups_hit_random"] = int(len(np.unique(pool_group[control])))
        out["top_groups"] = {str(groups[i]): int(counts[i]) for i in top}
    return out
