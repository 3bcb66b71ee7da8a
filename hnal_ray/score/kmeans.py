"""The project's one k-means: a seeded FAISS fit (flat, or two levels above a few thousand clusters),
an exact nearest-centre assignment (float32 GEMM, float64 re-check of the rows the rounding bound
cannot decide) and the integer Lloyd sums that make a sharded refinement independent of how the
rows are cut into shards, blocks and actors.

Every caller goes through `fit_centres` and `assign`: the cluster strategies of `hnal score` (whose
Lloyd steps run on the score workers, `hnal_ray.score.job`), the training batches of look-alikes,
the report's diagnostic clusters and the pruned scoring path.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hnal_ray.score.baselines import random_keys

FLAT_MAX = 1024          # above this many clusters the fit has two levels: cost ~ n sqrt(k) d, not n k d
QUANT = 2.0 ** 32        # Lloyd sums in fixed point: exact in int64 for up to 2^31 rows of |x_i| <= 1
FIT_SALT = 0x5EED_C1A5   # the fit sample's hash keys are drawn apart from the random strategy's
_U = 2.0 ** -24


def row_norms(x: np.ndarray, block: int = 65536) -> np.ndarray:
    """(n,) float64 L2 norms of float32 rows, a block at a time (no float64 copy of x)."""
    out = np.empty(len(x))
    for lo in range(0, len(x), block):
        out[lo:lo + block] = np.sqrt((x[lo:lo + block].astype(np.float64) ** 2).sum(1))
    return out


def fit_fraction(n_items: int, k: int, max_points_per_centroid: int) -> float:
    """Share of the items (pool and paired alike, so each side in proportion to its count) that the
    fit sees: at most `max_points_per_centroid x k` of them."""
    return min(1.0, max_points_per_centroid * k / max(n_items, 1))


def in_fit(ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """(n,) bool: whether each id is in the fit sample. A per-row rule (a seeded hash of the id below
    `fraction`), so any worker decides it for its own rows and the sample does not depend on files,
    shards or order."""
    if fraction >= 1.0:
        return np.ones(len(ids), bool)
    return random_keys(np.asarray(ids, np.int64), seed + FIT_SALT) < fraction


def fit_centres(x: np.ndarray, k: int, seed: int, niter: int = 20, gpu: bool = False) -> np.ndarray:
    """(min(k, n), d) float64 centres of the (n, d) rows `x`, given in a fixed (id) order.

    Up to FLAT_MAX clusters: one seeded FAISS k-means. Above: two levels, as FAISS's
    `contrib.clustering.two_level_clustering` and balanced hierarchical k-means do: sqrt(k) coarse
    clusters, then each coarse cluster split into a share of the k fine ones proportional to its
    size (largest remainder, at least one, at most its rows). The caller bounds n (the sample)."""
    x = np.ascontiguousarray(x, np.float32)
    k = max(1, min(int(k), len(x)))
    if k <= FLAT_MAX:
        return _faiss_fit(x, k, seed, niter, gpu)
    k1 = int(round(math.sqrt(k)))
    coarse = _faiss_fit(x, k1, seed, niter, gpu)
    label = assign(x, coarse)
    sizes = np.bincount(label, minlength=k1)
    share = split_clusters(k, sizes)
    order = np.argsort(label, kind="stable")
    bounds = np.r_[0, np.cumsum(sizes)]
    parts = [_faiss_fit(x[order[bounds[g]:bounds[g + 1]]], int(share[g]), seed + 1 + g, niter, gpu)
             for g in range(k1) if share[g] > 0]
    return np.concatenate(parts)


def split_clusters(k: int, sizes: np.ndarray) -> np.ndarray:
    """(g,) int: k fine clusters shared over coarse groups of `sizes` rows, proportional to size by
    largest remainder (ties to the smaller group index), at least 1 for a non-empty group and at most
    its rows; sums to min(k, sizes.sum())."""
    sizes = np.asarray(sizes, np.int64)
    k = int(min(k, sizes.sum()))
    share = np.minimum(sizes, np.where(sizes > 0, 1, 0))
    while share.sum() < k:
        room = sizes - share
        want = k * sizes / sizes.sum() - share           # how far each group is below its exact share
        want[room <= 0] = -np.inf
        g = int(np.argmax(want))                          # first index among ties
        share[g] += 1
    return share


def _faiss_fit(x: np.ndarray, k: int, seed: int, niter: int, gpu: bool) -> np.ndarray:
    import faiss

    k = min(k, len(x))
    if k == len(x):  # as many clusters as rows: every row is a centre
        return x.astype(np.float64)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, gpu=gpu,
                      min_points_per_centroid=1, max_points_per_centroid=max(1, -(-len(x) // k)))
    km.train(x, init_centroids=kmeans_pp(x, k, seed))
    return km.centroids.astype(np.float64)


def kmeans_pp(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(k, d) float32 greedy k-means++ seeds of the (n, d) rows (seeded D^2 sampling of 2 + ln k
    candidates a step, keeping the one that lowers the potential most, as scikit-learn does; FAISS
    seeds at random, which leaves well-separated clusters merged or split). Cost k GEMMs of (n, d)
    by (d, 2 + ln k): the flat fit is kept to FLAT_MAX clusters for it."""
    rng = np.random.default_rng(seed)
    n, trials = len(x), 2 + int(math.log(k))
    x2 = row_norms(x) ** 2

    def dist(rows):
        return np.maximum(x2[:, None] - 2 * (x @ x[rows].T).astype(np.float64) + x2[rows][None, :], 0)

    chosen = [int(rng.integers(n))]
    d2 = dist(chosen)[:, 0]
    for _ in range(1, k):
        cum = np.cumsum(d2)
        if cum[-1] <= 0:  # fewer distinct rows than k: the first rows not yet chosen
            rest = np.setdiff1d(np.arange(n), chosen)
            chosen += rest[:k - len(chosen)].tolist()
            break
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), n - 1)
        new = np.minimum(d2[:, None], dist(cand))
        best = int(np.argmin(new.sum(0)))
        chosen.append(int(cand[best]))
        d2 = new[:, best]
    return np.ascontiguousarray(x[chosen], np.float32)


def assign_bound(dim: int, x_norm: np.ndarray, c_norm_max: float, unit: float = _U) -> np.ndarray:
    """(n,) largest error of a float32 `|c|^2 - 2 x.c` against its exact value, for rows of norm
    `x_norm`: the dot's accumulation (gamma_d |x||c|, any summation order), the centres' and the
    squared norms' rounding to float32 and the subtraction, taken 2x for accumulators that are not
    strictly round-to-nearest (the argument of hnal_ray.score.lowprec). `unit`: the GEMM's unit
    roundoff (2^-24; coarser where CUDA may round float32 products to TF32)."""
    gamma = (dim + 4) * unit / (1 - (dim + 4) * unit)
    return 2 * gamma * (np.asarray(x_norm, np.float64) + c_norm_max) ** 2 + 1e-30


def _matmul_unit(device: torch.device) -> float:
    """The unit roundoff of a float32 matmul on `device` (as hnal_ray.score.pruning reads it)."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return _U if torch.get_float32_matmul_precision() == "highest" and not tf32 else 2.0 ** -8


def assign(x: np.ndarray, centres: np.ndarray, device: torch.device | None = None, block: int = 1024,
           chunk: int = 1024, with_distance: bool = False):
    """(n,) int64 nearest centre of each (n, d) row by squared L2, the answer of the float64 reference
    (hnal_ray.score.reference.dense_assign, first index among ties).

    Float32 GEMMs (on `device`, cache-sized: `block` rows x `chunk` centres) give each row its two
    nearest centres; where the second is within twice the proven rounding bound of the first, the
    row is re-ranked against every centre in float32 and its candidates (those within the bound of
    its minimum) compared in float64. Each row's label is a function of that row and the centres
    only: the same for any block, shard, actor count or device.
    `with_distance`: also the (n,) float64 squared distance to that centre."""
    device = device or torch.device("cpu")
    x = np.ascontiguousarray(x, np.float32)
    c64 = np.asarray(centres, np.float64)
    n, k = len(x), len(c64)
    label = np.zeros(n, np.int64)
    if n == 0 or k == 0:
        return (label, np.zeros(n)) if with_distance else label
    c2 = (c64 * c64).sum(1)
    slack = 2 * assign_bound(x.shape[1], row_norms(x), float(np.sqrt(c2.max())),
                             _matmul_unit(device)) * (1 + 4 * _U)
    ct = torch.from_numpy(c64.astype(np.float32)).to(device)
    c2t = torch.from_numpy(c2.astype(np.float32)).to(device)
    with torch.inference_mode():
        for lo in range(0, n, block):
            xb = torch.from_numpy(x[lo:lo + block]).to(device)
            best = torch.full((len(xb), 2), float("inf"), device=device)
            arg = torch.zeros(len(xb), dtype=torch.int64, device=device)
            for c0 in range(0, k, chunk):   # the two smallest of every row over all chunks
                dist = torch.addmm(c2t[None, c0:c0 + chunk], xb, ct[c0:c0 + chunk].T, beta=1, alpha=-2)
                two = torch.topk(dist, min(2, dist.shape[1]), dim=1, largest=False)
                vals = torch.cat([best, two.values], 1)
                idx = torch.cat([arg[:, None].expand(-1, 2), two.indices + c0], 1)
                order = torch.sort(vals, dim=1, stable=True)
                best = order.values[:, :2]
                arg = torch.gather(idx, 1, order.indices[:, :1])[:, 0]
            lab = arg.cpu().numpy().astype(np.int64)
            gap = (best[:, 1] - best[:, 0]).cpu().numpy()
            for r in np.flatnonzero(~(gap > slack[lo:lo + len(lab)])):  # undecided rows: rare
                label_r = _recheck(x[lo + r], c64, ct, c2t, slack[lo + r], device)
                lab[r] = label_r
            label[lo:lo + block] = lab
    if with_distance:
        diff = x.astype(np.float64) - c64[label]
        return label, (diff * diff).sum(1)
    return label


def _recheck(row: np.ndarray, c64: np.ndarray, ct: torch.Tensor, c2t: torch.Tensor, slack: float,
             device: torch.device) -> int:
    """One undecided row: its float32 candidates (within `slack` of its minimum, over every centre),
    then the least float64 distance among them, the smaller index among ties."""
    d = (c2t - 2 * (ct @ torch.from_numpy(row).to(device))).cpu().numpy()
    idx = np.flatnonzero(d <= d.min() + slack)
    d64 = ((row.astype(np.float64)[None, :] - c64[idx]) ** 2).sum(1)
    return int(idx[int(np.argmin(d64))])


def lloyd_sums(x: np.ndarray, label: np.ndarray, k: int, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(sums (k, d) int64, counts (k,) int64) of the (n, d) rows of each cluster, in fixed point
    (each value rounded to a multiple of 2^-32 on its own): integer sums are exact, so adding the
    parts of any sharding in any order gives the same totals and the same centres. `block` rows are
    converted at a time, so the working memory does not grow with n.

    x: unit-norm rows (|x_i| <= 1), as every embedding of this project is after reading."""
    sums = np.zeros((k, x.shape[1]), np.int64)
    counts = np.bincount(label, minlength=k).astype(np.int64)
    for lo in range(0, len(x), block):
        xb, lab = np.asarray(x[lo:lo + block], np.float64), label[lo:lo + block]
        if np.abs(xb).max() > 1 + 1e-6:
            raise ValueError("lloyd_sums needs L2-normalised rows (every |x_i| <= 1)")
        order = np.argsort(lab, kind="stable")
        lab = lab[order]
        starts = np.r_[0, np.flatnonzero(np.diff(lab)) + 1]
        sums[lab[starts]] += np.add.reduceat(np.rint(xb[order] * QUANT).astype(np.int64), starts, axis=0)
    return sums, counts


def lloyd_update(centres: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(k, d) float64 new centres from the reduced fixed-point sums; an empty cluster keeps its centre."""
    mean = sums.astype(np.float64) / QUANT / np.maximum(counts, 1)[:, None]
    return np.where(counts[:, None] > 0, mean, np.asarray(centres, np.float64))


def cluster_labels(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(centres (k', d) float64, labels (n,) int64) of small in-memory rows in a fixed order: the fit
    and the exact assignment in one call, for the training batches, diagnostics and pruning."""
    centres = fit_centres(x, k, seed, niter)
    return centres, assign(x, centres)
