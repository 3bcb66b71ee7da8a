"""Ranking and top-B selection with the SPEC's tie-breaks; the merge of the shards' top-B lists."""
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


def top_rows(ids: np.ndarray, scores: np.ndarray, max_margin: np.ndarray, n: int) -> np.ndarray:
    """Positions of the `n` best items: higher score, then larger max_margin (NaN last), then smaller id."""
    mm = np.where(np.isnan(max_margin), -np.inf, max_margin)
    return np.lexsort((ids, -mm, -scores))[:n]


def select_top(ids: np.ndarray, scores: np.ndarray, max_margin: np.ndarray, budget: int) -> Ranked:
    """The `budget` best items: higher score, then larger max_margin (NaN last), then smaller id."""
    order = top_rows(ids, scores, max_margin, budget)
    return Ranked(ids[order].astype(np.int64), scores[order].astype(np.float64),
                  max_margin[order].astype(np.float32))


def merge_top(parts: list[Ranked], budget: int) -> Ranked:
    """Global top-B from per-shard top-B lists; independent of the number and order of shards."""
    return select_top(np.concatenate([p.ids for p in parts]), np.concatenate([p.scores for p in parts]),
                      np.concatenate([p.max_margin for p in parts]), budget)


def select_reducible(ids: np.ndarray, scores: np.ndarray, ref_ids: np.ndarray, ref_scores: np.ndarray,
                     max_margin: np.ndarray, budget: int) -> Ranked:
    """Top-B by reducible hardness: score under the current model minus the score of the same item
    under a reference model (ids: (n,) in the same order in both). An item infinitely hard under
    both (a -inf threshold) has difference 0. Ties as in `select_top`."""
    if not np.array_equal(ids, ref_ids):
        raise ValueError("the current and reference scores must list the same items in the same order")
    with np.errstate(invalid="ignore"):
        diff = np.nan_to_num(np.asarray(scores, np.float64) - np.asarray(ref_scores, np.float64), nan=0.0)
    return select_top(ids, diff, max_margin, budget)
