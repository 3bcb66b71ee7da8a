"""Coverage selection: greedy hard negatives that discount the anchors an earlier pick already beats.

Definition (docs/selection.md, "Coverage"). With the SPEC's weights w_uj (Surplus or Counting)
and C(S) the anchors beaten (w_uj > 0) by some item of the picks S so far, the next pick is

    argmax over u not in S of  gain(u | S) = sum over j not in C(S) of w_uj,

with w_uj and "beaten" taken on the float64 margin m_uj = s(u, t_j) - xi_j less a tolerance tau
(`tolerance`: the float32 rounding of the score kernel, 1.6e-5 at d = 256): beaten iff m_uj > tau,
Surplus w_uj = m_uj - tau, Counting w_uj = 1,

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

# Surplus: a candidate's float64 gain against a held-back item's score, whose float32 block sums
# (accumulated in float64) may be low by about log2(n) ulp of the sum; this much relative is given away
SLACK = 1e-5


def tolerance(dim: int) -> float:
    """tau: the most a float32 margin fl(fl(u.a) - xi) of unit vectors (norm within a few ulp of 1)
    can differ from the float64 margin of the same inputs: the fp32 product (gamma_d, taken 4x for
    accumulators that are not strictly round-to-nearest), the subtraction (2^-23) and the threshold's
    rounding to float32 (2^-24), with 1% to spare. Full-precision float32 matmuls are assumed (torch's
    default; not TF32)."""
    u = 2.0 ** -24
    return 1.01 * (4 * dim * u / (1 - dim * u) + 2.0 ** -23 + 2.0 ** -24)


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


def beaten(emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str, tol: float = 0.0
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, anchor, weight) of the anchors each row of `emb` beats by more than `tol`, in
    float64, one row at a time (a row's result does not depend on which other rows come with it);
    Surplus weights are margin - tol."""
    a = np.asarray(anchor_emb, np.float64)
    xi = np.asarray(thresholds, np.float64)
    indptr, idx, w = [0], [], []
    for row in np.asarray(emb, np.float64):
        margin = a @ row - xi
        hit = np.flatnonzero(margin > tol)
        idx.append(hit.astype(np.int32))
        w.append(margin[hit] - tol if weight == "surplus" else np.ones(len(hit)))
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
                               thresholds, weight, tolerance(anchor_emb.shape[1]))
    return Candidates(ranked, indptr, anchor, w, nxt)


def _key(score: float, mm: float, id_: int) -> tuple:
    """Larger is earlier in the SPEC's order (NaN max_margin last)."""
    return (score, -np.inf if np.isnan(mm) else mm, -id_)


def greedy_cover(parts: list[Candidates], budget: int, n_anchors: int, slack: float = SLACK) -> Ranked | None:
    """The coverage selection from the shards' candidates (scores: each pick's gain when picked), or
    None when some pick cannot be proved from them (ask for more candidates). `slack`: 0 for
    Counting (integer gains and scores), SLACK for Surplus.

    A held-back item h has gain(h | S) <= score(h) <= `bound` (the best held-back score), because a
    gain counts an anchor only when the float64 margin exceeds tau, and then the float32 margin
    behind the score is positive and at least the Surplus weight. A candidate c is proved when
    gain(c) > bound, or gain(c) >= bound and c comes before every held-back item in the SPEC's
    order (a tied h loses the tie-break); with gain 0 that is the SPEC's order itself."""
    ids = np.concatenate([p.top.ids for p in parts])
    score = np.concatenate([p.top.scores for p in parts])
    mm = np.concatenate([p.top.max_margin for p in parts]).astype(np.float64)
    mm_key = np.where(np.isnan(mm), -np.inf, mm)
    indptr, anchor, weight, row_of = merged_rows(parts)
    held = [p.next_key for p in parts if p.next_key is not None]
    bound = max((k[0] for k in held), default=-np.inf) * (1 + slack)  # no held-back item gains more
    best_held = max((_key(*k) for k in held), default=None)             # the first held-back item, SPEC order
    covered = np.zeros(n_anchors, bool)
    free = np.ones(len(ids), bool)
    picked, gains = [], []
    while len(picked) < budget:
        if not free.any():  # every candidate picked: the pool is smaller than the budget, or ask for more
            return None if held else ranked_picks(ids, picked, gains, mm)
        gain = np.bincount(row_of, weights=np.where(covered[anchor], 0.0, weight), minlength=len(ids))
        gain = np.where(free, gain, -np.inf)
        c = np.lexsort((ids, -mm_key, -score, -gain))[0]
        if held and not (gain[c] > bound or (gain[c] >= bound and _key(score[c], mm[c], ids[c]) > best_held)):
            return None
        picked.append(c), gains.append(gain[c])
        free[c] = False
        covered[anchor[indptr[c]:indptr[c + 1]]] = True
    return ranked_picks(ids, picked, gains, mm)


def merged_rows(parts: list[Candidates]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shards' CSR rows as one: (indptr, column, value, the row of each entry), rows in part order."""
    offsets = np.cumsum([0] + [len(p.anchor) for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)]).astype(np.int64)
    col = np.concatenate([p.anchor for p in parts]) if parts else np.zeros(0, np.int32)
    val = np.concatenate([p.weight for p in parts]) if parts else np.zeros(0)
    return indptr, col, val, np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def ranked_picks(ids, picked, gains, mm) -> Ranked:
    p = np.asarray(picked, np.int64)
    return Ranked(ids[p].astype(np.int64), np.asarray(gains, np.float64), mm[p].astype(np.float32))


def dense_cover(ids: np.ndarray, emb: np.ndarray, scores: np.ndarray, max_margin: np.ndarray,
                anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str, budget: int) -> Ranked:
    """Every pool item a candidate: the single-process path (no bound needed)."""
    indptr, anchor, w = beaten(emb, anchor_emb, thresholds, weight, tolerance(anchor_emb.shape[1]))
    return greedy_cover([Candidates(Ranked(ids, scores, max_margin), indptr, anchor, w, None)], budget,
                        len(anchor_emb))


def empty_candidates() -> Candidates:
    """What a shard with no rows sends."""
    z = np.zeros(0)
    return Candidates(Ranked(z.astype(np.int64), z, z.astype(np.float32)), np.zeros(1, np.int64),
                      np.zeros(0, np.int32), z, None)
