"""Coverage selection: greedy hard negatives that discount the anchors an earlier pick already beats.

Definition (docs/selection.md, "Coverage"). With the SPEC's weights w_uj (Surplus or Counting)
and C(S) the anchors beaten (w_uj > 0) by some item of the picks S so far, the next pick is

    argmax over u not in S of  gain(u | S) = sum over j not in C(S) of w_uj,

ties broken as the SPEC's selection (higher score, larger max_margin, smaller id); once no item
has a positive gain, the rest of the budget follows the SPEC's order. B = 1 is Top-1 selection.

Sharded exactly: gain(u | S) <= score(u) for every S, so each shard sends its best M items by the
SPEC's order with the anchors each beats (`Candidates`) and the key of its next item; the driver
runs the greedy over the candidates and proves every pick against the best item a shard held back
(`greedy_cover`); when it cannot, the caller asks the shards for 4x as many candidates. The gains
are computed in float64, one item at a time, so they do not depend on how the pool is cut.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnal_ray.score.selection import Ranked, select_top

# a candidate's float64 gain against a held-back item's float32-summed score: the latter may be low
# by a few ulp per anchor; this much (relative, at least 1e-9 absolute) is always given away
SLACK = 1e-5


@dataclass(frozen=True)
class Candidates:
    """One shard's best items in the SPEC's order, with the anchors each beats as CSR rows
    (anchor row index, weight), and the (score, max_margin, id) of its best item left out (None:
    it left none out)."""

    top: Ranked
    indptr: np.ndarray   # (m + 1,) int64
    anchor: np.ndarray   # (nnz,) int32, ascending within a row
    weight: np.ndarray   # (nnz,) float64
    next_key: tuple[float, float, int] | None


def beaten(emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, anchor, weight) of the anchors each row of `emb` beats, in float64, one row at a
    time (a row's result does not depend on which other rows come with it)."""
    a = np.asarray(anchor_emb, np.float64)
    xi = np.asarray(thresholds, np.float64)
    indptr, idx, w = [0], [], []
    for row in np.asarray(emb, np.float64):
        margin = a @ row - xi
        hit = np.flatnonzero(margin > 0)
        idx.append(hit.astype(np.int32))
        w.append(margin[hit] if weight == "surplus" else np.ones(len(hit)))
        indptr.append(indptr[-1] + len(hit))
    cat = (lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t))
    return np.asarray(indptr, np.int64), cat(idx, np.int32), cat(w, np.float64)


def shard_candidates(ids: np.ndarray, scores: np.ndarray, max_margin: np.ndarray, emb_of, m: int,
                     anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str) -> Candidates:
    """A shard's candidates: its best `m` items (SPEC order) and what each beats; `emb_of(rows)`
    returns the embeddings of those rows of the shard."""
    ranked = select_top(ids, scores, max_margin, m + 1)
    nxt = None
    if len(ranked) > m:
        nxt = (float(ranked.scores[m]), float(ranked.max_margin[m]), int(ranked.ids[m]))
        ranked = Ranked(ranked.ids[:m], ranked.scores[:m], ranked.max_margin[:m])
    sorter = np.argsort(ids, kind="stable")
    indptr, anchor, w = beaten(emb_of(sorter[np.searchsorted(ids, ranked.ids, sorter=sorter)]), anchor_emb,
                               thresholds, weight)
    return Candidates(ranked, indptr, anchor, w, nxt)


def _key(score: float, mm: float, id_: int) -> tuple:
    """Larger is earlier in the SPEC's order (NaN max_margin last)."""
    return (score, -np.inf if np.isnan(mm) else mm, -id_)


def greedy_cover(parts: list[Candidates], budget: int, n_anchors: int) -> Ranked | None:
    """The coverage selection from the shards' candidates (scores: each pick's gain when picked), or
    None when some pick cannot be proved from them (ask for more candidates)."""
    ids = np.concatenate([p.top.ids for p in parts])
    score = np.concatenate([p.top.scores for p in parts])
    mm = np.concatenate([p.top.max_margin for p in parts]).astype(np.float64)
    mm_key = np.where(np.isnan(mm), -np.inf, mm)
    offsets = np.cumsum([0] + [len(p.anchor) for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)]).astype(np.int64)
    anchor = np.concatenate([p.anchor for p in parts]) if parts else np.zeros(0, np.int32)
    weight = np.concatenate([p.weight for p in parts]) if parts else np.zeros(0)
    row_of = np.repeat(np.arange(len(ids)), np.diff(indptr))
    held = [p.next_key for p in parts if p.next_key is not None]
    bound = max((k[0] for k in held), default=-np.inf)       # no held-back item gains more than this
    best_held = max((_key(*k) for k in held), default=None)  # the first held-back item in SPEC order
    covered = np.zeros(n_anchors, bool)
    free = np.ones(len(ids), bool)
    picked, gains = [], []
    while len(picked) < budget:
        if not free.any():  # every candidate picked: the pool is smaller than the budget, or ask for more
            return None if held else _ranked(ids, picked, gains, mm)
        gain = np.bincount(row_of, weights=np.where(covered[anchor], 0.0, weight), minlength=len(ids))
        gain = np.where(free, gain, -np.inf)
        order = np.lexsort((ids, -mm_key, -score, -gain))
        c = order[0]
        if gain[c] > 0:
            if held and gain[c] <= bound * (1 + SLACK) + 1e-9:
                return None  # a held-back item might gain as much
        elif held and (bound > 1e-9 or _key(score[c], mm[c], ids[c]) < best_held):
            return None      # a held-back item might still gain, or come first in the SPEC's order
        picked.append(c), gains.append(max(gain[c], 0.0))
        free[c] = False
        covered[anchor[indptr[c]:indptr[c + 1]]] = True
    return _ranked(ids, picked, gains, mm)


def _ranked(ids, picked, gains, mm) -> Ranked:
    p = np.asarray(picked, np.int64)
    return Ranked(ids[p].astype(np.int64), np.asarray(gains, np.float64), mm[p].astype(np.float32))


def dense_cover(ids: np.ndarray, emb: np.ndarray, scores: np.ndarray, max_margin: np.ndarray,
                anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str, budget: int) -> Ranked:
    """The single-process reference: every pool item a candidate (the oracle of the sharded path)."""
    indptr, anchor, w = beaten(emb, anchor_emb, thresholds, weight)
    return greedy_cover([Candidates(Ranked(ids, scores, max_margin), indptr, anchor, w, None)], budget,
                        len(anchor_emb))
