"""Scoring work: a worker takes shards of the pool (or of the paired keys) one after another,
streams each from Parquet in blocks and runs the pure kernels on them.

The in-process backend calls one worker directly; the Ray backend wraps one per actor
(hnal_ray.cluster) and feeds them shards from a queue.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hnal_ray.score.baselines import random_keys
from hnal_ray.score.clusters import centrality, per_cluster_top, typical_picks
from hnal_ray.score.kmeans import assign, in_fit, lloyd_sums
from hnal_ray.device import peak_mib, pick_device, set_threads
from hnal_ray.io import embedding_array, iter_embeddings, write_parquet
from hnal_ray.score.lowprec import score_pool_lowprec
from hnal_ray.score.pruning import AnchorClusters, score_pool_pruned
from hnal_ray.score.scoring import score_pool
from hnal_ray.score.coverage import Candidates, empty_candidates, shard_candidates
from hnal_ray.score import herding
from hnal_ray.score.selection import Ranked, select_top, top_rows
from hnal_ray.score.thresholds import merge_topk, negative_topk

log = logging.getLogger(__name__)
LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ShardSpec:
    """A bounded slice of one input table: rows [rows) of `path` (cut at row-group boundaries where
    it can be), read in blocks by whichever worker takes it."""

    index: int
    path: str
    id_column: str
    group_column: str | None  # keys: None = a key's group is its own id (paired images)
    rows: tuple[int, int]
    dim: int

    def __len__(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass(frozen=True)
class Anchors:
    """The broadcast side: ids (n_a,) int64, group (n_a,) owning image id, emb (n_a, d) float32."""

    ids: np.ndarray
    group: np.ndarray
    emb: np.ndarray


@dataclass(frozen=True)
class ScoreTask:
    strategy: str
    weight: str
    budget: int
    seed: int
    block_pool: int
    block_anchor: int
    centres: np.ndarray | None = None  # cluster strategy: (k, d) float64 k-means centres
    within: str = "hardest"
    quota: str = "equal"            # cluster strategy: "hardness" also counts each cluster's hard negatives
    stream_rows: int = 65536        # rows read from Parquet at a time
    precision: str = "fp32"         # fp16/bf16: the exact low-precision path (hnal_ray.score.lowprec)
    candidates: int = 0             # coverage, probcover, maxherding: items a shard sends to the driver's greedy
    support: np.ndarray | None = None  # probcover/maxherding: (|U|, d) float64 support rows
    covered: np.ndarray | None = None  # probcover/maxherding: (|U|,) float64 coverage by the paired items
    kernel: herding.Kernel | None = None
    anchor_clusters: AnchorClusters | None = None  # method pruned: k-means of the anchors (hnal_ray.score.pruning)


@dataclass(frozen=True)
class ShardResult:
    index: int
    top: Ranked
    rows: int
    pairs: int
    seconds: float
    node: str
    pid: int
    top_cluster: np.ndarray | None = None     # cluster strategy: the cluster of each candidate in `top`
    cluster_counts: np.ndarray | None = None  # cluster strategy: (k,) this shard's pool items per cluster
    recomputed: int = 0                       # low precision: pairs recomputed in float64
    cluster_hard: np.ndarray | None = None    # quota hardness: (k,) this shard's items with a positive score
    candidates: Candidates | None = None      # coverage strategy: the shard's best items and what they beat


class ScoreWorker:
    """Takes shards one after another (a Ray actor pulls them from the driver's queue), streaming each
    from Parquet in blocks: its memory is set by the block sizes, the anchors and one shard's
    per-item scores (28 bytes a row), never by the pool size."""

    def __init__(self, device: str = "auto", threads: int | None = None):
        if threads:
            set_threads(threads)
        self.device = pick_device(device)
        self.rows = self.shards = 0

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": socket.gethostname(), "device": str(self.device),
                "rows": self.rows, "shards": self.shards, "peak_rss_mib": round(peak_mib(), 1)}

    def threshold_part(self, spec: ShardSpec, anchors: Anchors, k: int, stream_rows: int = 65536) -> np.ndarray:
        """(n_a, k) top-k negative similarities of each anchor among this key shard's rows."""
        part = np.full((len(anchors.ids), k), -np.inf)
        for keys in iter_embeddings(spec.path, spec.id_column, spec.group_column, spec.dim, *spec.rows, stream_rows):
            group = keys.owner if keys.owner is not None else keys.ids
            part = merge_topk([part, negative_topk(anchors.emb, anchors.group, keys.emb, group, k, self.device)], k)
        return part

    def score(self, spec: ShardSpec, task: ScoreTask, anchors: Anchors | None, thresholds: np.ndarray | None,
              part_path: str) -> ShardResult:
        """Score one pool shard block by block, write every item's score to `part_path`, return the
        shard's local top-B (per cluster for the cluster strategy)."""
        t0 = time.perf_counter()
        ids, scores, margins, clusters, hard, pairs, recomputed = [], [], [], [], [], 0, 0
        cand = None  # coverage: the running best `candidates` + 1 rows (ids, scores, margins, embeddings)
        for block in iter_embeddings(spec.path, spec.id_column, None, spec.dim, *spec.rows, task.stream_rows):
            s, m, c, n, again = self._score_block(block.ids, block.emb, task, anchors, thresholds)
            if task.strategy == "coverage" or task.kernel is not None:
                cand = _keep_best(cand, (block.ids, s, m, block.emb), task.candidates + 1)
            ids.append(block.ids), scores.append(s), margins.append(m), clusters.append(c)
            pairs, recomputed = pairs + n, recomputed + again
            if task.strategy == "cluster" and task.quota == "hardness":
                hardness = s if task.within == "hardest" else self._hardness(block.emb, task, anchors, thresholds)
                hard.append(c[hardness > 0])
        ids, scores, margin = np.concatenate(ids), np.concatenate(scores), np.concatenate(margins)
        cluster = np.concatenate(clusters) if task.strategy == "cluster" else None
        write_parquet(score_table(spec.id_column, ids, scores, margin, cluster), part_path)
        seconds = time.perf_counter() - t0
        self.rows, self.shards = self.rows + len(ids), self.shards + 1
        log.info("shard %d: %d items x %d anchors in %.2fs (%.3g pairs/s)", spec.index, len(ids),
                 0 if anchors is None else len(anchors.ids), seconds, pairs / max(seconds, 1e-9))
        if cluster is not None:
            top, top_cluster = per_cluster_top(ids, scores, margin, cluster, task.budget)
            k = len(task.centres)
            return ShardResult(spec.index, top, len(ids), pairs, seconds, socket.gethostname(), os.getpid(),
                               top_cluster, np.bincount(cluster, minlength=k), recomputed,
                               np.bincount(np.concatenate(hard), minlength=k) if hard else None)
        if task.kernel is not None:
            cands = empty_candidates() if cand is None else herding.shard_candidates(
                *cand[:3], lambda rows: cand[3][rows], task.candidates, task.support, task.covered, task.kernel)
            return ShardResult(spec.index, cands.top, len(ids), pairs, seconds, socket.gethostname(), os.getpid(),
                               candidates=cands)
        if task.strategy == "coverage":
            cands = empty_candidates() if cand is None else shard_candidates(
                *cand[:3], lambda rows: cand[3][rows], task.candidates, anchors.emb, thresholds, task.weight)
            return ShardResult(spec.index, cands.top, len(ids), pairs, seconds, socket.gethostname(), os.getpid(),
                               recomputed=recomputed, candidates=cands)
        return ShardResult(spec.index, select_top(ids, scores, margin, task.budget), len(ids), pairs,
                           seconds, socket.gethostname(), os.getpid(), recomputed=recomputed)

    # ------------------------------------------------------------- k-means passes (hnal_ray.score.kmeans)

    def lloyd_part(self, spec: ShardSpec, centres: np.ndarray, fraction: float, seed: int,
                   stream_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """One Lloyd step's (sums (k, d) int64 fixed point, counts (k,)) over this shard's rows in the
        fit sample (a per-row hash rule), each row assigned exactly."""
        k = len(centres)
        sums, counts = np.zeros((k, spec.dim), np.int64), np.zeros(k, np.int64)
        for block in iter_embeddings(spec.path, spec.id_column, None, spec.dim, *spec.rows, stream_rows):
            keep = in_fit(block.ids, seed, fraction)
            s, c = lloyd_sums(block.emb[keep], assign(block.emb[keep], centres, self.device), k)
            sums += s
            counts += c
        return sums, counts

    def count_part(self, spec: ShardSpec, centres: np.ndarray, stream_rows: int = 65536) -> np.ndarray:
        """(k,) int64 rows of this shard nearest each centre (the paired items of each cluster)."""
        counts = np.zeros(len(centres), np.int64)
        for block in iter_embeddings(spec.path, spec.id_column, None, spec.dim, *spec.rows, stream_rows):
            counts += np.bincount(assign(block.emb, centres, self.device), minlength=len(centres))
        return counts

    def typical_part(self, spec: ShardSpec, scores_path: str, keep_below: np.ndarray, seed: int, out_path: str,
                     stream_rows: int = 65536) -> int:
        """Write this shard's rows in the clusters being picked from (id, cluster, embedding; sorted by
        cluster, then id) to `out_path`: a row is kept when its seeded key is below its cluster's
        `keep_below` (1 for a cluster up to the size cap, so all of it; less above). The clusters come
        from the shard's scored part, so the pool is not assigned again. Returns the rows written."""
        part = pq.read_table(scores_path, columns=[spec.id_column, "cluster"])
        part_ids, part_cluster = part[spec.id_column].to_numpy(), part["cluster"].to_numpy().astype(np.int64)
        ids, cluster, emb = [], [], []
        for block in iter_embeddings(spec.path, spec.id_column, None, spec.dim, *spec.rows, stream_rows):
            c = part_cluster[np.searchsorted(part_ids, block.ids)]
            keep = random_keys(block.ids, seed + 1) < keep_below[c]
            ids.append(block.ids[keep]), cluster.append(c[keep]), emb.append(block.emb[keep])
        ids, cluster = np.concatenate(ids), np.concatenate(cluster)
        emb = np.concatenate(emb) if ids.size else np.zeros((0, spec.dim), np.float32)
        order = np.lexsort((ids, cluster))
        write_parquet(pa.table({"id": pa.array(ids[order], pa.int64()), "cluster": pa.array(cluster[order], pa.int64()),
                                "embedding": embedding_array(emb[order])}), out_path, row_group_size=4096)
        return int(len(ids))

    def typical_chunk(self, paths: list[str], clusters: np.ndarray, picks: np.ndarray, dim: int,
                      neighbours: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """TypiClust's picks of the given clusters (sorted), `picks[i]` from `clusters[i]`, from the rows
        all shards wrote for them: (ids, typicality, cluster, rank within the cluster)."""
        lo, hi = int(clusters[0]), int(clusters[-1])
        parts = [pq.read_table(p, filters=[("cluster", ">=", lo), ("cluster", "<=", hi)]) for p in paths]
        t = pa.concat_tables(parts)
        ids, cl = t["id"].to_numpy(), t["cluster"].to_numpy()
        emb = np.asarray(t["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                         np.float32).reshape(-1, dim)
        order = np.lexsort((ids, cl))
        ids, cl, emb = ids[order], cl[order], emb[order]
        out = ([], [], [], [])
        for c, q in zip(clusters, picks):
            a, b = np.searchsorted(cl, c), np.searchsorted(cl, c, side="right")
            rows, typ = typical_picks(ids[a:b], emb[a:b], int(q), neighbours)
            for lst, v in zip(out, (ids[a:b][rows], typ, np.full(len(rows), c), np.arange(len(rows)))):
                lst.append(v)
        return tuple(np.concatenate(v) if v else np.zeros(0) for v in out)

    def _hardness(self, emb, task: ScoreTask, anchors, thresholds) -> np.ndarray:
        """The hard-negative score of each row (for quota hardness when the order within a cluster is not)."""
        return self._exact(emb, task, anchors, thresholds).scores

    def _exact(self, emb, task: ScoreTask, anchors, thresholds):
        """hnal_ray.score.scoring.score_pool, or its pruned form (the same numbers, fewer products)."""
        if task.anchor_clusters is not None:
            return score_pool_pruned(emb, anchors.emb, thresholds, task.weight, self.device, task.block_pool,
                                     task.block_anchor, clusters=task.anchor_clusters)
        return score_pool(emb, anchors.emb, thresholds, task.weight, self.device, task.block_pool, task.block_anchor)

    def _score_block(self, ids, emb, task: ScoreTask, anchors, thresholds):
        """(scores, max_margin, cluster or None, pairs, pairs recomputed) of one block; every value is
        per item, so the results do not depend on how the pool is cut into shards and blocks."""
        cluster = assign(emb, task.centres, self.device) if task.strategy == "cluster" else None
        nan = np.full(len(ids), np.nan, np.float32)
        if task.kernel is not None:  # probcover/maxherding: an upper bound of each row's first gain
            bounds = herding.gain_bounds(emb, task.support, task.covered, task.kernel, self.device,
                                         task.block_pool, task.block_anchor)
            return bounds, herding.order_key(ids, task.seed), None, len(ids) * len(task.support), 0
        if cluster is not None and task.within in ("central", "typical"):  # typical: picked in a later pass
            return centrality(emb, task.centres, cluster), nan, cluster, 0, 0
        if task.strategy == "random" or (cluster is not None and task.within == "random"):
            return random_keys(ids, task.seed), nan, cluster, 0, 0
        if task.precision != "fp32":
            res = score_pool_lowprec(emb, anchors.emb, thresholds, task.weight, self.device, task.block_pool,
                                     max(task.block_anchor, 8192), LOW[task.precision])
            return res.scores, res.max_margin, cluster, res.pairs, res.recomputed
        res = self._exact(emb, task, anchors, thresholds)
        return res.scores, res.max_margin, cluster, res.pairs, 0


def _keep_best(kept: tuple | None, block: tuple, n: int) -> tuple:
    """The best `n` rows (SPEC order) of what was kept so far and this block: (ids, scores, margins, emb)."""
    cols = block if kept is None else tuple(np.concatenate([a, b]) for a, b in zip(kept, block))
    rows = top_rows(cols[0], cols[1], cols[2], n)
    return tuple(c[rows] for c in cols)


def score_table(id_column: str, ids: np.ndarray, scores: np.ndarray, max_margin: np.ndarray,
                cluster: np.ndarray | None = None) -> pa.Table:
    """Per-item scores, sorted by id: the `scores.parquet` contract (+ `cluster` for the cluster strategy)."""
    order = np.argsort(ids, kind="stable")
    cols = {id_column: pa.array(ids[order], pa.int64()), "score": pa.array(scores[order], pa.float64()),
            "max_margin": pa.array(max_margin[order].astype(np.float64), pa.float64())}
    if cluster is not None:
        cols["cluster"] = pa.array(cluster[order], pa.int32())
    return pa.table(cols)
