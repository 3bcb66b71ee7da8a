"""Ranking and top-B selection with the SPEC's tie-breaks; the one merge step for shards."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ranked:
    """Pool items in rank order. ids: (m,) int64; scores: (m,) float64; max_margin: (m,) float32."""

    ids: np.ndarray
    scores: np.ndarray
    max_margin: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def select_top(ids: np.ndarray, scores: np.ndarray, max_margin: np.ndarray, budget: int) -> Ranked:
    """The `budget` best items: higher score, then larger max_margin (NaN last), then smaller id."""
    mm = np.where(np.isnan(max_margin), -np.inf, max_margin)
    order = np.lexsort((ids, -mm, -scores))[:budget]
    return Ranked(ids[order].astype(np.int64), scores[order].astype(np.float64),
                  max_margin[order].astype(np.float32))


def merge_top(parts: list[Ranked], budget: int) -> Ranked:
    """Global top-B from per-shard top-B lists; independent of the number and order of shards."""
    return select_top(np.concatenate([p.ids for p in parts]), np.concatenate([p.scores for p in parts]),
                      np.concatenate([p.max_margin for p in parts]), budget)
