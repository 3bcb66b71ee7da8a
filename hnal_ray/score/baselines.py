"""The baselines the hard-negative score is compared with: Random and Core-set (greedy k-center)."""
from __future__ import annotations

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def random_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) key per id from a seeded SplitMix64 hash.

    ids: (n,) int64 -> (n,) float64. Keyed by id, not by position, so any sharding of the pool
    draws the same keys; the B largest keys are a uniform random B-subset.
    """
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(seed % 2**63) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def nearest_center_sqdist(pool_emb: np.ndarray, center_emb: np.ndarray) -> np.ndarray:
    """(n_u,) float32 squared distance of each pool item to its nearest centre (exact FAISS L2)."""
    import faiss

    if len(center_emb) == 0:
        return np.full(len(pool_emb), np.inf, dtype=np.float32)
    dist, _ = faiss.knn(np.ascontiguousarray(pool_emb, dtype=np.float32),
                        np.ascontiguousarray(center_emb, dtype=np.float32), 1, metric=faiss.METRIC_L2)
    return np.maximum(dist[:, 0], 0)


def coreset_select(pool_emb: np.ndarray, center_emb: np.ndarray, budget: int,
                   device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy k-center (SPEC "Core-set"), centres initialised with the paired items.

    pool_emb: (n_u, d) float32 in pool-id order (ties go to the smaller id); center_emb: (n_c, d).
    Returns (picked row indices in pick order (B,), their distance when picked (B,) float64,
    every item's distance to its nearest centre after all picks (n_u,) float64).
    """
    device = device or torch.device("cpu")
    pool = torch.from_numpy(np.ascontiguousarray(pool_emb, dtype=np.float32)).to(device)
    d2 = torch.from_numpy(nearest_center_sqdist(pool_emb, center_emb)).to(device)
    picked, at_pick = [], []
    with torch.inference_mode():
        for _ in range(budget):
            i = int(torch.argmax(d2))  # first maximum = smallest pool id among ties
            picked.append(i)
            at_pick.append(float(d2[i]))
            d2 = torch.minimum(d2, ((pool - pool[i]) ** 2).sum(dim=1))
    final = d2.cpu().numpy().astype(np.float64)
    return np.array(picked, dtype=np.int64), np.sqrt(np.array(at_pick, dtype=np.float64)), np.sqrt(final)
