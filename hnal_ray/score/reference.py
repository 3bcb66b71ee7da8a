"""The dense single-process reference: the SPEC applied literally, in float64 (oracle for tests)."""
from __future__ import annotations

import numpy as np

from hnal_ray.score.thresholds import minibatch_assignment


def dense_thresholds(text_emb: np.ndarray, text_owner: np.ndarray, image_emb: np.ndarray,
                     image_ids: np.ndarray, k: int, side: str, batch_size: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """xi (n_t,) on the image side or zeta (n_p,) on the text side, float64, from the full matrix."""
    s = text_emb.astype(np.float64) @ image_emb.astype(np.float64).T  # (n_t, n_p)
    batch = minibatch_assignment(len(text_emb), batch_size, seed) if batch_size else np.zeros(len(text_emb), int)
    if side == "image":
        out = np.empty(len(text_emb))
        for j in range(len(text_emb)):
            in_batch = set(image_ids.tolist()) if batch_size is None else set(text_owner[batch == batch[j]].tolist())
            neg = [s[j, p] for p in range(len(image_ids))
                   if image_ids[p] != text_owner[j] and image_ids[p] in in_batch]
            out[j] = sorted(neg, reverse=True)[k - 1] if len(neg) >= k else -np.inf
        return out
    out = np.empty(len(image_ids))
    for p in range(len(image_ids)):
        own = np.flatnonzero(text_owner == image_ids[p])
        home = batch[own].min() if len(own) else None
        neg = [s[j, p] for j in range(len(text_emb)) if text_owner[j] != image_ids[p]
               and (batch_size is None or (home is not None and batch[j] == home))]
        out[p] = sorted(neg, reverse=True)[k - 1] if len(neg) >= k else -np.inf
    return out


def dense_scores(pool_emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray,
                 weight: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores (n_u,), max_margin (n_u,)) in float64 from the materialised (n_u, n_a) matrix."""
    s = pool_emb.astype(np.float64) @ anchor_emb.astype(np.float64).T
    margin = s - thresholds.astype(np.float64)[None, :]
    w = np.maximum(0.0, margin) if weight == "surplus" else (s > thresholds[None, :]).astype(np.float64)
    return w.sum(axis=1), margin.max(axis=1) if margin.shape[1] else np.full(len(s), -np.inf)


def dense_select(ids: np.ndarray, scores: np.ndarray, max_margin: np.ndarray, budget: int) -> np.ndarray:
    """Selected ids by sorting Python tuples: the SPEC's ordering written out once more."""
    keyed = sorted(zip(ids.tolist(), scores.tolist(), max_margin.tolist()), key=lambda r: (-r[1], -r[2], r[0]))
    return np.array([r[0] for r in keyed[:budget]], dtype=np.int64)


def dense_assign(emb: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Nearest centre of each row by squared L2 in float64 from the full (n, k) matrix, first index on ties."""
    d = ((emb.astype(np.float64)[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return d.argmin(axis=1)


def dense_lloyd(x: np.ndarray, centres: np.ndarray, steps: int) -> np.ndarray:
    """`steps` Lloyd steps in plain float64 from `centres`: each row to its dense_assign centre, each
    centre to the mean of its rows (an empty cluster keeps its centre)."""
    x, c = np.asarray(x, np.float64), np.array(centres, np.float64)
    for _ in range(steps):
        label = dense_assign(x, c)
        for j in range(len(c)):
            if (label == j).any():
                c[j] = x[label == j].mean(0)
    return c


def dense_quota_select(ids: np.ndarray, scores: np.ndarray, max_margin: np.ndarray, cluster: np.ndarray,
                       n_clusters: int, budget: int, quota: str, hardness: np.ndarray | None = None,
                       paired_cluster: np.ndarray | None = None, min_size: int = 0) -> np.ndarray:
    """The cluster-quota rule written out with Python sorts: rank items within their cluster by the
    SPEC's order, key = (rank + 1) / weight (1, the cluster's size, or its number of items whose
    hard-negative score `hardness` is > 0, at least 1), then the `budget` smallest keys. Quota
    uncovered (TypiClust): key = (at most `min_size` pool and paired items, rank, its number of
    paired items (its entries in `paired_cluster`), minus its pool and paired items, the cluster)."""
    sizes = np.bincount(cluster, minlength=n_clusters)
    pool_sizes = sizes
    if quota == "hardness":
        sizes = np.bincount(cluster[np.asarray(hardness) > 0], minlength=n_clusters)
    labelled = [0] * n_clusters
    for c in [] if paired_cluster is None else paired_cluster:
        labelled[int(c)] += 1
    rows = []
    for c in range(n_clusters):
        members = [(int(i), float(s), -np.inf if np.isnan(m) else float(m))
                   for i, s, m, cc in zip(ids, scores, max_margin, cluster) if cc == c]
        members.sort(key=lambda r: (-r[1], -r[2], r[0]))
        if quota == "uncovered":
            total = int(pool_sizes[c]) + labelled[c]
            rows += [((total <= min_size, rank, labelled[c], -total, c), -s, -m, i)
                     for rank, (i, s, m) in enumerate(members)]
        else:
            weight = 1.0 if quota == "equal" else float(max(sizes[c], 1))  # proportional, hardness
            rows += [((rank + 1) / weight, -s, -m, i) for rank, (i, s, m) in enumerate(members)]
    rows.sort()
    return np.array([r[3] for r in rows[:budget]], dtype=np.int64)


def dense_coverage(ids: np.ndarray, pool_emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray,
                   weight: str, budget: int, tol: float) -> np.ndarray:
    """Coverage picks (docs/selection.md) by the definition, one candidate at a time, from the
    materialised matrix: an anchor is beaten when the margin exceeds `tol` (weight margin - tol
    for Surplus); gain = weights of the anchors no earlier pick beats; ties as the SPEC."""
    s = pool_emb.astype(np.float64) @ anchor_emb.astype(np.float64).T
    margin = s - thresholds.astype(np.float64)[None, :]
    w = np.where(margin > tol, margin - tol, 0.0) if weight == "surplus" else (margin > tol).astype(np.float64)
    score, _ = dense_scores(pool_emb, anchor_emb, thresholds, weight)  # the SPEC's score breaks gain ties
    mm = margin.max(axis=1) if margin.shape[1] else np.full(len(s), -np.inf)
    covered, picked = np.zeros(len(anchor_emb), bool), []
    for _ in range(min(budget, len(ids))):
        best = min((-w[u, ~covered].sum(), -score[u], -mm[u], int(ids[u]), u)
                   for u in range(len(ids)) if u not in picked)
        picked.append(best[-1])
        covered |= w[best[-1]] > 0
    return ids[np.asarray(picked, np.int64)].astype(np.int64)


def dense_typical(ids: np.ndarray, emb: np.ndarray, picks: int, neighbours: int = 20) -> list[int]:
    """TypiClust's picks from one cluster written out pair by pair: typicality = 1 / (mean squared L2
    distance to the min(neighbours, n // 2) nearest other items + 1e-5), the most typical (smallest
    id among ties) taken and removed, again `picks` times."""
    left = sorted(zip(ids.tolist(), np.asarray(emb, np.float64)), key=lambda r: r[0])
    out = []
    for _ in range(min(picks, len(left))):
        m = min(neighbours, len(left) // 2)
        best = None
        for i, (a, x) in enumerate(left):
            d = sorted(float(((x - y) ** 2).sum()) for j, (_, y) in enumerate(left) if j != i)
            t = np.inf if m == 0 else 1.0 / (np.mean(d[:m]) + 1e-5)
            if best is None or t > best[0]:
                best = (t, i)
        out.append(left.pop(best[1])[0])
    return out


def dense_generalized_coverage(ids: np.ndarray, pool_emb: np.ndarray, support: np.ndarray, paired: np.ndarray,
                               kernel, budget: int, tiebreak: np.ndarray) -> list[int]:
    """ProbCover / MaxHerding literally: the full float64 kernel matrix, c_u = max over paired and
    picks, each pick the largest sum_u max(0, k(u, x) - c_u), ties to the larger `tiebreak`, then
    the smaller id. `kernel(d2)` maps squared distances to kernel values; d2 is the definition's
    max(0, |x|^2 + |u|^2 - 2 u.x), u.x from numpy's matrix-vector product of the support and x
    (a float64 expression whose last bit depends on the summation order, so it is spelled out)."""
    u = np.asarray(support, np.float64)
    un = np.einsum("ij,ij->i", u, u)

    def k_of(a):
        return kernel(np.array([np.maximum(float(x @ x) + un - 2.0 * (u @ x), 0.0)
                                for x in np.asarray(a, np.float64)]).reshape(len(a), len(u)))

    big = k_of(pool_emb)
    c = k_of(paired).max(0) if len(paired) else np.zeros(len(support))
    free, out = np.ones(len(ids), bool), []
    for _ in range(min(budget, len(ids))):
        gain = np.maximum(big - c, 0.0).sum(1)
        best = max((i for i in range(len(ids)) if free[i]), key=lambda i: (gain[i], tiebreak[i], -ids[i]))
        out.append(int(ids[best]))
        free[best] = False
        c = np.maximum(c, big[best])
    return out


def dense_purity_radius(x: np.ndarray, labels: np.ndarray, purity: float) -> float:
    """ProbCover's delta by brute force: the largest radius r, among the rows' distances to their
    nearest row of another cluster, at which a `purity` share of the open r-balls is pure."""
    d = np.sqrt(((np.asarray(x, np.float64)[:, None] - np.asarray(x, np.float64)[None]) ** 2).sum(-1))
    other = np.array([d[i, labels != labels[i]].min() if (labels != labels[i]).any() else np.inf
                      for i in range(len(x))])
    ok = [r for r in other if (other >= r).mean() >= purity]
    return float(max(ok))
