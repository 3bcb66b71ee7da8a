"""One shard of a scoring job: loads its own rows from Parquet and runs the pure kernels on them.

The in-process backend calls it directly; the Ray backend wraps it in an actor (hnal_ray.cluster).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from hnal_ray.score.baselines import random_keys
from hnal_ray.score.clusters import assign, centrality, per_cluster_top
from hnal_ray.device import pick_device, set_threads
from hnal_ray.io import EmbeddingTable, read_embeddings, write_parquet
from hnal_ray.score.scoring import score_pool
from hnal_ray.score.selection import Ranked, select_top
from hnal_ray.score.thresholds import negative_topk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """Where a shard's rows live: pool rows [pool_rows) and key rows [key_rows) of the inputs."""

    index: int
    pool_path: str
    pool_id_column: str
    pool_rows: tuple[int, int]
    key_path: str
    key_id_column: str
    key_group_column: str | None  # None: a key's group is its own id (paired images)
    key_rows: tuple[int, int]
    dim: int


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
    fail_marker: str | None = None  # test switch: die once, mid-shard, if this file is absent
    centres: np.ndarray | None = None  # cluster strategy: (k, d) float64 k-means centres
    within: str = "hardest"


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


class ShardWorker:
    def __init__(self, spec: ShardSpec, device: str = "auto", threads: int | None = None):
        if threads:
            set_threads(threads)
        self.spec = spec
        self.device = pick_device(device)
        self.pool = read_embeddings(spec.pool_path, spec.pool_id_column, dim=spec.dim,
                                    start=spec.pool_rows[0], stop=spec.pool_rows[1])
        self.keys = read_embeddings(spec.key_path, spec.key_id_column, spec.key_group_column,
                                    dim=spec.dim, start=spec.key_rows[0], stop=spec.key_rows[1])

    def info(self) -> dict:
        return {"shard": self.spec.index, "pool_rows": len(self.pool), "key_rows": len(self.keys),
                "node": socket.gethostname(), "pid": os.getpid(), "device": str(self.device)}

    def threshold_part(self, anchors: Anchors, k: int) -> np.ndarray:
        """(n_a, k) top-k negative similarities of each anchor among this shard's keys."""
        keys: EmbeddingTable = self.keys
        group = keys.owner if keys.owner is not None else keys.ids
        return negative_topk(anchors.emb, anchors.group, keys.emb, group, k, self.device)

    def score(self, task: ScoreTask, anchors: Anchors | None, thresholds: np.ndarray | None,
              part_path: str) -> ShardResult:
        """Score this shard, write every item's score to `part_path`, return the local top-B."""
        t0 = time.perf_counter()
        ids = self.pool.ids
        cluster = assign(self.pool.emb, task.centres) if task.strategy == "cluster" else None
        if cluster is not None and task.within == "central":
            scores, margin, pairs = (centrality(self.pool.emb, task.centres, cluster),
                                     np.full(len(ids), np.nan, np.float32), 0)
        elif task.strategy == "random" or (cluster is not None and task.within == "random"):
            scores, margin, pairs = random_keys(ids, task.seed), np.full(len(ids), np.nan, np.float32), 0
        else:
            res = score_pool(self.pool.emb, anchors.emb, thresholds, task.weight, self.device,
                             task.block_pool, task.block_anchor)
            scores, margin, pairs = res.scores, res.max_margin, res.pairs
        if task.fail_marker and not Path(task.fail_marker).exists():
            Path(task.fail_marker).touch()
            log.error("injected failure in shard %d", self.spec.index)
            os._exit(17)
        write_parquet(score_table(self.spec.pool_id_column, ids, scores, margin, cluster), part_path)
        seconds = time.perf_counter() - t0
        log.info("shard %d: %d items x %d anchors in %.2fs (%.3g pairs/s)", self.spec.index, len(ids),
                 0 if anchors is None else len(anchors.ids), seconds, pairs / max(seconds, 1e-9))
        if cluster is not None:
            top, top_cluster = per_cluster_top(ids, scores, margin, cluster, task.budget)
            return ShardResult(self.spec.index, top, len(ids), pairs, seconds, socket.gethostname(), os.getpid(),
                               top_cluster, np.bincount(cluster, minlength=len(task.centres)))
        return ShardResult(self.spec.index, select_top(ids, scores, margin, task.budget), len(ids), pairs,
                           seconds, socket.gethostname(), os.getpid())


def score_table(id_column: str, ids: np.ndarray, scores: np.ndarray, max_margin: np.ndarray,
                cluster: np.ndarray | None = None) -> pa.Table:
    """Per-item scores, sorted by id: the `scores.parquet` contract (+ `cluster` for the cluster strategy)."""
    order = np.argsort(ids, kind="stable")
    cols = {id_column: pa.array(ids[order], pa.int64()), "score": pa.array(scores[order], pa.float64()),
            "max_margin": pa.array(max_margin[order].astype(np.float64), pa.float64())}
    if cluster is not None:
        cols["cluster"] = pa.array(cluster[order], pa.int32())
    return pa.table(cols)
