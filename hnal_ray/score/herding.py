"""ProbCover and MaxHerding: greedy generalized coverage of a support sample, exact and sharded.

Definition (docs/selection.md, "Generalized coverage"). U is the support: the pool and paired
items in a seeded per-row sample (all of them up to `--support` items). With a kernel k on
squared distances, c_u = max over the paired items and the picks so far of k(u, .), and

    gain(x | S) = sum over u in U of max(0, k(u, x) - c_u),

each pick maximises the gain (Bae et al. 2024, "Generalized coverage for more robust low-budget
active learning": C(L) = E_u[max over L of k(u, .)]); ties go to the smaller seeded random key
of the id, then the smaller id, so a fully covered support falls back to a seeded random order
as ProbCover does. ProbCover (Yehuda et al. 2022) is the ball kernel 1[d(u, x) < delta], with
delta the largest radius whose balls are pure for a fraction `purity` of the support (a ball is
pure when every item in it shares its centre's k-means cluster); MaxHerding is the Gaussian kernel
exp(-d^2 / (2 sigma^2)), sigma by default the median distance from a support item to its 20th
nearest neighbour. Distances are float64 (|x|^2 + |u|^2 - 2 x.u, one row at a time).

Sharded exactly as the coverage strategy (hnal_ray.score.coverage): gain(x | S) <= gain(x | {})
<= ub(x), an upper bound each shard computes for all its rows from float32 GEMMs with the
distance error bound given away. A shard sends its best `m` rows by ub with the support entries
whose kernel value exceeds c_u (no other entry can ever add to a gain, since c only grows) and
the ub of its best row held back; the driver runs the greedy over the candidates in float64 and
proves every pick against that bound, or asks the shards for 4x as many candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hnal_ray.score.baselines import random_keys
from hnal_ray.score.coverage import Candidates, empty_candidates, merged_rows, ranked_picks
from hnal_ray.score.selection import Ranked, top_rows

KINDS = ("ball", "gauss")
SLACK = 1e-9     # relative: the float64 sum of a bound's float64 terms
NEIGHBOURS = 20  # the bandwidth rule's neighbour (TypiClust's kNN size)


@dataclass(frozen=True)
class Kernel:
    """k(d2) on a squared distance: "ball" 1[d2 < scale^2] (ProbCover's open delta-ball) or
    "gauss" exp(-d2 / (2 scale^2)) (MaxHerding)."""

    kind: str
    scale: float

    def of(self, d2: np.ndarray) -> np.ndarray:
        d2 = np.asarray(d2, np.float64)
        if self.kind == "ball":
            return (d2 < self.scale ** 2).astype(np.float64)
        return np.exp(-d2 / (2.0 * self.scale ** 2))

    def upper(self, d2: torch.Tensor, tol: torch.Tensor | float) -> torch.Tensor:
        """An upper bound of k(exact d2) from a float32 `d2` off by at most `tol`."""
        lo = torch.clamp(d2 - tol, min=0.0)
        if self.kind == "ball":
            return (lo < self.scale ** 2).to(d2.dtype)
        return torch.exp(-lo / (2.0 * self.scale ** 2))


def sq_dist64(support: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(n, |U|) float64 squared distances |x|^2 + |u|^2 - 2 x.u of the rows of `x` to the support,
    clipped at 0, one matrix-vector product per row: a row's numbers do not depend on the rows
    that come with it (a GEMM's do, through its blocking)."""
    u = np.asarray(support, np.float64)
    x = np.atleast_2d(np.asarray(x, np.float64))
    un = np.einsum("ij,ij->i", u, u)
    out = np.empty((len(x), len(u)))
    for i, row in enumerate(x):
        out[i] = np.maximum(float(row @ row) + un - 2.0 * (u @ row), 0.0)
    return out


def coverage_of(support: np.ndarray, items: np.ndarray, kernel: Kernel) -> np.ndarray:
    """(|U|,) c_u = max over `items` of k(u, item) (0 without items), float64."""
    c = np.zeros(len(support))
    items = np.asarray(items, np.float64)
    for a in range(0, len(items), 256):
        np.maximum(c, kernel.of(sq_dist64(support, items[a:a + 256])).max(0), out=c)
    return c


def candidate_rows(emb: np.ndarray, support: np.ndarray, covered: np.ndarray, kernel: Kernel
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, support index, kernel value) of each row of `emb`: the support entries whose
    float64 kernel value exceeds their coverage (the only ones that can ever add to its gain)."""
    indptr, idx, val = [0], [], []
    emb = np.asarray(emb, np.float64)
    for a in range(0, len(emb), 256):
        k = kernel.of(sq_dist64(support, emb[a:a + 256]))
        for row in k:
            hit = np.flatnonzero(row > covered)
            idx.append(hit.astype(np.int32)), val.append(row[hit])
            indptr.append(indptr[-1] + len(hit))
    cat = (lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t))
    return np.asarray(indptr, np.int64), cat(idx, np.int32), cat(val, np.float64)


def distance_tolerance(dim: int, x_norm: torch.Tensor, u_norm_max: float) -> torch.Tensor:
    """The most a float32 |x|^2 + |u|^2 - 2 x.u can differ from the exact squared distance: the
    dot's accumulation (gamma_d |x||u|, taken 4x for accumulators that are not strictly
    round-to-nearest), the norms' and the sum's rounding, with room to spare."""
    u = 2.0 ** -24
    gamma = (dim + 4) * u / (1 - (dim + 4) * u)
    scale = (x_norm.double() + u_norm_max) ** 2
    return (8 * gamma * scale + 8 * u * scale).to(torch.float32)


def gain_bounds(emb: np.ndarray, support: np.ndarray, covered: np.ndarray, kernel: Kernel,
                device: torch.device, block_rows: int = 4096, block_support: int = 4096) -> np.ndarray:
    """(n,) float64 ub(x) >= gain(x | {}) for each row: float32 distances to every support row, each
    kernel value bounded above over the distance's error, summed in float64."""
    if len(emb) == 0:
        return np.zeros(0)
    dim = support.shape[1]
    u = torch.as_tensor(np.ascontiguousarray(support, np.float32), device=device)
    un = (u.double() ** 2).sum(1).float()
    c = torch.as_tensor(covered, device=device)
    u_norm_max = float(un.max().sqrt()) if len(u) else 0.0
    out = np.zeros(len(emb))
    for a in range(0, len(emb), block_rows):
        x = torch.as_tensor(np.ascontiguousarray(emb[a:a + block_rows], np.float32), device=device)
        xn = (x.double() ** 2).sum(1).float()
        tol = distance_tolerance(dim, xn.sqrt(), u_norm_max)[:, None]
        total = torch.zeros(len(x), dtype=torch.float64, device=device)
        for b in range(0, len(u), block_support):
            d2 = xn[:, None] + un[None, b:b + block_support] - 2.0 * (x @ u[b:b + block_support].T)
            k = kernel.upper(d2, tol).double()
            total += torch.clamp(k - c[None, b:b + block_support], min=0.0).sum(1)
        out[a:a + len(x)] = (total * (1 + SLACK)).cpu().numpy()
    return out


def order_key(ids: np.ndarray, seed: int) -> np.ndarray:
    """The tie-break after the gain, as a `max_margin` (larger first): minus the seeded random key."""
    return (-random_keys(np.asarray(ids, np.int64), seed)).astype(np.float32)


def shard_candidates(ids: np.ndarray, bounds: np.ndarray, tiebreak: np.ndarray, emb_of, m: int,
                     support: np.ndarray, covered: np.ndarray, kernel: Kernel) -> Candidates:
    """A shard's best `m` rows by (ub, tie-break, id) with their support entries, and the key of
    its best row held back (None: none held back). `emb_of(rows)` gives the rows' embeddings."""
    if len(ids) == 0:
        return empty_candidates()
    rows = top_rows(ids, bounds, tiebreak, m + 1)
    nxt = None
    if len(rows) > m:
        r = rows[m]
        nxt = (float(bounds[r]), float(tiebreak[r]), int(ids[r]))
        rows = rows[:m]
    indptr, idx, val = candidate_rows(emb_of(rows), support, covered, kernel)
    return Candidates(Ranked(ids[rows].astype(np.int64), bounds[rows].astype(np.float64),
                             tiebreak[rows].astype(np.float32)), indptr, idx, val, nxt)


def greedy_herd(parts: list[Candidates], budget: int, covered: np.ndarray) -> Ranked | None:
    """The generalized-coverage picks from the shards' candidates (scores: each pick's gain when
    picked; max_margin: its tie-break key), or None when a pick cannot be proved from them.

    A held-back item h has gain(h | S) <= ub(h) <= `bound` (its shard's best held-back ub), so a
    candidate is proved when its gain exceeds the bound, or equals it and the candidate comes first
    by (tie-break, id) against the best held-back item."""
    ids = np.concatenate([p.top.ids for p in parts])
    tie = np.concatenate([p.top.max_margin for p in parts]).astype(np.float64)
    indptr, sup, val, row_of = merged_rows(parts)
    sup, val = sup.astype(np.int64), val.astype(np.float64)
    held = [p.next_key for p in parts if p.next_key is not None]
    bound = max((k[0] for k in held), default=-np.inf)
    best_held = max(((k[1], -k[2]) for k in held if k[0] == bound), default=None)
    c = np.array(covered, np.float64, copy=True)
    free = np.ones(len(ids), bool)
    picked, gains = [], []
    while len(picked) < budget:
        if not free.any():
            return None if held else ranked_picks(ids, picked, gains, tie)
        gain = np.bincount(row_of, weights=np.maximum(val - c[sup], 0.0), minlength=len(ids))
        gain = np.where(free, gain, -np.inf)
        p = np.lexsort((ids, -tie, -gain))[0]
        if held and not (gain[p] > bound or (gain[p] == bound and (tie[p], -ids[p]) > best_held)):
            return None
        picked.append(p), gains.append(gain[p])
        free[p] = False
        s = sup[indptr[p]:indptr[p + 1]]
        c[s] = np.maximum(c[s], val[indptr[p]:indptr[p + 1]])
    return ranked_picks(ids, picked, gains, tie)


# ----------------------------------------------------------------------- the kernel's scale

def pairwise_sq(x: np.ndarray, device: torch.device, block: int = 2048):
    """Yields (row offset, float32 squared distances of a block of rows to all rows)."""
    t = torch.as_tensor(np.ascontiguousarray(x, np.float32), device=device)
    n2 = (t.double() ** 2).sum(1).float()
    for a in range(0, len(t), block):
        d2 = n2[a:a + block, None] + n2[None, :] - 2.0 * (t[a:a + block] @ t.T)
        yield a, torch.clamp(d2, min=0.0)


def purity_radius(x: np.ndarray, labels: np.ndarray, purity: float, device: torch.device) -> float:
    """ProbCover's delta: the largest radius whose open balls around a `purity` share of the rows
    hold only rows of their own cluster. With o_i a row's distance to its nearest row of another
    cluster (infinite in a single cluster), the ball around i is pure iff o_i >= delta, so delta is
    the floor((1 - purity) n)-th smallest o_i (0-based). Float32 distances: a parameter, computed
    once on the driver."""
    lab = torch.as_tensor(np.asarray(labels, np.int64), device=device)
    other = np.empty(len(x))
    for a, d2 in pairwise_sq(x, device):
        same = lab[a:a + len(d2), None] == lab[None, :]
        other[a:a + len(d2)] = torch.where(same, torch.full_like(d2, np.inf), d2).min(1).values.cpu().numpy()
    o = np.sort(np.sqrt(other))
    return float(o[min(int(np.floor((1.0 - purity) * len(o))), len(o) - 1)])  # inf: one cluster


def knn_bandwidth(x: np.ndarray, device: torch.device, neighbours: int = NEIGHBOURS) -> float:
    """MaxHerding's default sigma: the median distance from a row to its `neighbours`-th nearest
    other row (fewer for tiny supports)."""
    q = min(neighbours, len(x) - 1)
    if q < 1:
        return 1.0
    dist = np.empty(len(x))
    for a, d2 in pairwise_sq(x, device):
        dist[a:a + len(d2)] = torch.topk(d2, q + 1, dim=1, largest=False).values[:, q].sqrt().cpu().numpy()
    return float(max(np.median(dist), 1e-6))


def dense_herd(ids: np.ndarray, emb: np.ndarray, support: np.ndarray, covered: np.ndarray, kernel: Kernel,
               budget: int, seed: int) -> Ranked:
    """Every pool item a candidate: the single-process reference (no bound needed)."""
    indptr, idx, val = candidate_rows(emb, support, covered, kernel)
    tie = order_key(ids, seed)
    return greedy_herd([Candidates(Ranked(ids, np.zeros(len(ids)), tie), indptr, idx, val, None)], budget, covered)
