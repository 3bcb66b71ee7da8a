"""Blocked hard-negative scores of pool items: Surplus or Counting weights summed over anchors.

Memory is set by the block sizes (block_pool x block_anchor floats), never pool x anchors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WEIGHTS = ("surplus", "counting")


@dataclass(frozen=True)
class PoolScores:
    """scores: (n,) float64 sum_j w_uj; max_margin: (n,) float32 max_j (s_uj - xi_j)."""

    scores: np.ndarray
    max_margin: np.ndarray
    pairs: int


def score_pool(pool_emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str,
               device: torch.device | None = None, block_pool: int = 4096,
               block_anchor: int = 8192) -> PoolScores:
    """Score every pool item against every anchor (SPEC "Hard-negative condition, weights, score").

    pool_emb: (n_u, d) float32 L2-normalised; anchor_emb: (n_a, d) float32 (paired texts on the
    image side, paired images on the text side); thresholds: (n_a,) float32, -inf allowed.
    Each block is one GEMM, one subtract, one max and one clamp-sum; block sums go to float64 so
    the score of an item does not depend on how the pool is blocked or sharded.
    """
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    device = device or torch.device("cpu")
    n_u, n_a = len(pool_emb), len(anchor_emb)
    scores = np.zeros(n_u, dtype=np.float64)
    max_margin = np.full(n_u, -np.inf, dtype=np.float32)
    anchors = _tensor(anchor_emb).to(device)
    xi = _tensor(thresholds).to(device)
    pool = _tensor(pool_emb)
    with torch.inference_mode():
        for u0 in range(0, n_u, block_pool):
            p = pool[u0:u0 + block_pool].to(device, non_blocking=True)
            acc = torch.zeros(len(p), dtype=torch.float64, device=device)
            mm = torch.full((len(p),), -torch.inf, dtype=torch.float32, device=device)
            for a0 in range(0, n_a, block_anchor):
                margin = p @ anchors[a0:a0 + block_anchor].T
                margin -= xi[a0:a0 + block_anchor]
                mm = torch.maximum(mm, margin.max(dim=1).values)
                if weight == "surplus":
                    acc += margin.clamp_(min=0).sum(dim=1, dtype=torch.float64)
                else:
                    acc += (margin > 0).sum(dim=1, dtype=torch.float64)
            scores[u0:u0 + len(p)] = acc.cpu().numpy()
            max_margin[u0:u0 + len(p)] = mm.cpu().numpy()
    return PoolScores(scores, max_margin, n_u * n_a)


def _tensor(x: np.ndarray) -> torch.Tensor:
    """float32 C-contiguous tensor; copies arrays that are read-only (e.g. from Ray's object store)."""
    return torch.from_numpy(np.require(x, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
