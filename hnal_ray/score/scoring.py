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


def block_weights(margin: torch.Tensor, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max (m,) float32 and row weight sum (m,) float64 of a (m, n) float32 margin block.

    The block is overwritten. Rows whose max is <= 0 weigh nothing and are not summed at all; the
    others are summed in float32 (torch's cascade sum, error O(log n) ulp) and accumulated in float64
    by the caller. Casting the whole block to float64 instead costs as much as the GEMM on a CPU.
    """
    top = margin.amax(dim=1)
    rows = (top > 0).nonzero().squeeze(1)
    hit = margin if len(rows) == len(margin) else margin.index_select(0, rows)
    w = hit.clamp_(min=0).sum(dim=1) if weight == "surplus" else (hit > 0).sum(dim=1, dtype=torch.float32)
    if len(rows) == len(margin):
        return top, w.double()
    return top, torch.zeros(len(margin), dtype=torch.float64, device=margin.device).index_add_(0, rows, w.double())


def score_pool(pool_emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str,
               device: torch.device | None = None, block_pool: int = 4096, block_anchor: int = 1024,
               dtype: torch.dtype = torch.float32) -> PoolScores:
    """Score every pool item against every anchor (SPEC "Hard-negative condition, weights, score").

    pool_emb: (n_u, d) float32 L2-normalised; anchor_emb: (n_a, d) float32 (paired texts on the
    image side, paired images on the text side); thresholds: (n_a,) float32, -inf allowed.
    Per block one GEMM into a reused (block_pool, block_anchor) buffer, then `block_weights`; block
    sums go to float64, so an item's score does not depend on how the pool is blocked or sharded.
    dtype=bfloat16 is a low-precision variant (inputs rounded; not exact), for the benchmark.
    """
    check_weight(weight)
    device = device or torch.device("cpu")
    n_u, n_a = len(pool_emb), len(anchor_emb)
    scores, max_margin = np.zeros(n_u), np.full(n_u, -np.inf, np.float32)
    anchors, xi = as_float32_tensor(anchor_emb).to(device, dtype), as_float32_tensor(thresholds).to(device)
    pool = as_float32_tensor(pool_emb)
    buf = torch.empty(min(block_pool, n_u) * min(block_anchor, n_a), device=device)
    with torch.inference_mode():
        for u0 in range(0, n_u, block_pool):
            p = pool[u0:u0 + block_pool].to(device, dtype, non_blocking=True)
            acc = torch.zeros(len(p), dtype=torch.float64, device=device)
            mm = torch.full((len(p),), -torch.inf, device=device)
            for a0 in range(0, n_a, block_anchor):
                a = anchors[a0:a0 + block_anchor]
                margin = similarity_into(p, a, buf)
                top, total = block_weights(margin.sub_(xi[a0:a0 + len(a)]), weight)
                mm, acc = torch.maximum(mm, top), acc + total
            scores[u0:u0 + len(p)], max_margin[u0:u0 + len(p)] = acc.cpu().numpy(), mm.cpu().numpy()
    return PoolScores(scores, max_margin, n_u * n_a)


def similarity_into(p: torch.Tensor, a: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """p @ a.T as float32 (m, n), into the front of a reused flat buffer (no allocation) when float32."""
    if p.dtype != torch.float32:
        return (p @ a.T).float()
    out = buf[: len(p) * len(a)].view(len(p), len(a))
    return torch.matmul(p, a.T, out=out)



def as_float32_tensor(x: np.ndarray) -> torch.Tensor:
    """float32 C-contiguous tensor; copies arrays that are read-only (e.g. from Ray's object store)."""
    return torch.from_numpy(np.require(x, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))


def check_weight(weight: str) -> None:
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
