"""Per-anchor thresholds: the k-th hardest negative similarity (SPEC "Per-text threshold").

The same two functions serve both sides. An *anchor* is what gets a threshold (a paired text on
the image side, a paired image on the text side); a *key* is what its negatives are drawn from
(paired images, resp. paired texts). A key is a negative of an anchor iff their groups differ
(group = the owning image id on both tables), so one kernel covers both sides.
"""
from __future__ import annotations

import numpy as np
import torch

from hnal_ray.device import faiss_uses_gpu

_GPU_RES = None
_SLACK = 2  # extra candidates, so float32 near-ties at rank k are settled in float64


def _knn_ip(query: np.ndarray, keys: np.ndarray, kk: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-kk with FAISS (GPU when the device is CUDA): (n_q, kk) values, indices."""
    import faiss

    global _GPU_RES
    query = np.ascontiguousarray(query, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if faiss_uses_gpu(device) and kk <= 2048:
        _GPU_RES = _GPU_RES or faiss.StandardGpuResources()
        return faiss.knn_gpu(_GPU_RES, query, keys, kk, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(query, keys, kk, metric=faiss.METRIC_INNER_PRODUCT)


def negative_topk(anchor_emb: np.ndarray, anchor_group: np.ndarray, key_emb: np.ndarray,
                  key_group: np.ndarray, k: int, device: torch.device | None = None,
                  block: int = 4096) -> np.ndarray:
    """Top-k negative similarities of each anchor among these keys, descending.

    anchor_emb: (n_a, d) float32; anchor_group: (n_a,) int64; key_emb: (n_k, d); key_group: (n_k,).
    Returns (n_a, k) float64, padded with -inf where fewer than k negatives exist. Works on any
    shard of the keys; `merge_topk` combines shards. FAISS finds k + (largest group size) + 2
    candidates, so after dropping the anchor's own group at least k negatives remain; their
    similarities are then recomputed in float64, so a threshold does not depend on how FAISS
    blocked the search (i.e. on the sharding) and near-ties at rank k are settled exactly.
    """
    device = device or torch.device("cpu")
    n_a = len(anchor_emb)
    out = np.full((n_a, k), -np.inf)
    if n_a == 0 or len(key_emb) == 0:
        return out
    extra = int(np.unique(key_group, return_counts=True)[1].max())
    kk = min(k + extra + _SLACK, len(key_emb))
    _, idx = _knn_ip(anchor_emb, key_emb, kk, device)
    m = min(k, kk)
    for a0 in range(0, n_a, block):
        rows = slice(a0, a0 + block)
        cand = idx[rows]
        vals = np.einsum("id,icd->ic", anchor_emb[rows].astype(np.float64), key_emb[cand].astype(np.float64))
        vals[key_group[cand] == anchor_group[rows, None]] = -np.inf
        out[rows, :m] = -np.sort(-vals, axis=1)[:, :m]
    return out


def merge_topk(parts: list[np.ndarray], k: int) -> np.ndarray:
    """Merge per-shard (n_a, k) descending top-k lists into the global one."""
    vals = np.concatenate(parts, axis=1)
    return -np.sort(-vals, axis=1)[:, :k]


def kth(topk: np.ndarray, k: int) -> np.ndarray:
    """Thresholds (n_a,) float32 from merged top-k lists: the k-th value (-inf if fewer negatives)."""
    return topk[:, k - 1].astype(np.float32)


def minibatch_assignment(n_pairs: int, batch_size: int, seed: int) -> np.ndarray:
    """Batch index of each paired text (texts in text_id order): a seeded shuffle cut into batches."""
    perm = np.random.default_rng(seed).permutation(n_pairs)
    batch = np.empty(n_pairs, dtype=np.int64)
    batch[perm] = np.arange(n_pairs) // batch_size
    return batch


def minibatch_thresholds(text_emb: np.ndarray, text_owner: np.ndarray, image_emb: np.ndarray,
                         image_ids: np.ndarray, k: int, batch_size: int, seed: int,
                         side: str) -> np.ndarray:
    """Mini-batch thresholds (SPEC "Top-k, mini-batch").

    text_emb: (n_t, d) in text_id order; text_owner: (n_t,) image ids; image_emb: (n_p, d) with
    image_ids (n_p,) sorted. Image side: (n_t,) xi_j over the distinct images of t_j's batch other
    than its owner. Text side: (n_p,) zeta_p over the texts of the batch that holds p's first pair
    (first in the shuffled order) whose owner is not p. -inf where fewer than k negatives.
    """
    batch = minibatch_assignment(len(text_emb), batch_size, seed)
    owner_row = np.searchsorted(image_ids, text_owner)
    if side == "image":
        out = np.full(len(text_emb), -np.inf, dtype=np.float32)
    else:
        out = np.full(len(image_ids), -np.inf, dtype=np.float32)
        # batch index grows with shuffled position, so p's first pair sits in its smallest batch
        first = np.full(len(image_ids), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, owner_row, batch)
    n_batches = int(batch.max()) + 1 if len(batch) else 0
    by_batch = np.split(np.argsort(batch, kind="stable"), np.cumsum(np.bincount(batch, minlength=n_batches))[:-1])
    for b, texts in enumerate(by_batch):
        if side == "image":
            imgs = np.unique(owner_row[texts])
            topk = negative_topk(text_emb[texts], owner_row[texts], image_emb[imgs], imgs, k)
            out[texts] = kth(topk, k)
        else:
            imgs = np.flatnonzero(first == b)
            topk = negative_topk(image_emb[imgs], imgs, text_emb[texts], owner_row[texts], k)
            out[imgs] = kth(topk, k)
    return out
