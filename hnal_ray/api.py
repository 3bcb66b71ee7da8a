"""The public Python API (re-exported by `hnal_ray`): select from arrays or Parquet, run a loop,
load features. The `hnal` command line is a thin layer over these functions."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.data.features import FeatureSet, load_features
from hnal_ray.io import InputError, embedding_array, write_parquet

__all__ = ["Selection", "select", "run_loop", "load_features", "FeatureSet"]

TableLike = str | os.PathLike | pa.Table | Mapping


@dataclasses.dataclass(frozen=True)
class Selection:
    """`selection`: pool id, score, rank (1..B), sorted by rank; `scores`: every pool item's id,
    score and max_margin, sorted by id; `summary`: the run's summary.json as a dict."""

    selection: pa.Table
    scores: pa.Table
    summary: dict

    @property
    def ids(self) -> np.ndarray:
        """(B,) int64 selected pool ids, best first."""
        return self.selection.column(0).to_numpy()


def select(paired_images: TableLike, paired_texts: TableLike, pool: TableLike, budget: int,
           strategy: str = "hard-negative", *, weight: str = "surplus", k: int = 1,
           threshold_batch: int | None = None, side: str = "image", seed: int = 0, shards: int = 0,
           address: str | None = None, device: str = "auto", block_pool: int = 4096, block_anchor: int = 1024,
           clusters: int = 0, quota: str = "equal", within: str = "hardest", cluster_sample: int = 262144,
           wait: bool = False, out: str | os.PathLike | None = None, shard_rows: int = 1_000_000,
           stream_rows: int = 65536, precision: str = "fp32", candidates: int = 0,
           max_points_per_centroid: int = 32, fit_iters: int = 2, max_clusters: int = 0, min_cluster_size: int = 0,
           typical_cap: int = 1000, support: int = 65536, purity: float = 0.95,
           bandwidth: float = 0.0) -> Selection:
    """Score `pool` against the paired set and select the top `budget` items (`hnal score`).

    Each input is a Parquet path (file or directory), a pyarrow Table, or a mapping of column name
    to array in the input contract, e.g. `{"image_id": ids, "embedding": emb}` with `emb` an
    (n, d) array (see README, `hnal score`). `shards=0` runs in this process; `shards=N` runs N Ray
    actors (on `address`, RAY_ADDRESS, or an embedded Ray) that take shards of `shard_rows` rows
    from a queue, each streamed from Parquet `stream_rows` rows at a time. With `out` the outputs are kept there
    (a finished run with the same inputs, by content, is skipped before Ray starts; one run at a
    time writes an `out`, `wait` waits for another instead of refusing); without it they are
    returned only.
    Bad input raises `InputError` (naming the file, or the argument for in-memory inputs) and bad
    options `ConfigError`, as the command line reports them.
    """
    cfg = ScoreConfig(budget=budget, strategy=strategy, weight=weight, k=k, threshold_batch=threshold_batch,
                      side=side, seed=seed, shards=shards, address=address, device=device,
                      block_pool=block_pool, block_anchor=block_anchor, clusters=clusters, quota=quota,
                      within=within, cluster_sample=cluster_sample, wait=wait, shard_rows=shard_rows,
                      stream_rows=stream_rows, precision=precision, candidates=candidates,
                      max_points_per_centroid=max_points_per_centroid, fit_iters=fit_iters,
                      max_clusters=max_clusters, min_cluster_size=min_cluster_size, typical_cap=typical_cap,
                      support=support, purity=purity, bandwidth=bandwidth)
    scratch = Path(tempfile.mkdtemp(prefix="hnal-select-"))
    try:
        named = {}
        paths = {role: _as_path(value, role, scratch, named) for role, value in
                 (("paired_images", paired_images), ("paired_texts", paired_texts), ("pool", pool))}
        target = Path(out) if out is not None else scratch / "out"
        try:
            summary = _run_score(ScoreInputs(**paths), cfg, target)
        except InputError as exc:
            msg = str(exc)
            for tmp, label in named.items():
                msg = msg.replace(tmp, label)
            raise InputError(msg) from None
        return Selection(pq.read_table(target / "selection.parquet"), pq.read_table(target / "scores.parquet"),
                         summary)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_score(inputs: ScoreInputs, cfg: ScoreConfig, out: Path) -> dict:
    from hnal_ray.score.job import finished_summary

    done = finished_summary(inputs, cfg, out)  # before Ray starts: a finished re-run costs no cluster
    if done is not None:
        return done
    if cfg.shards > 0:
        from hnal_ray.cluster.score import run_score_on_ray

        return run_score_on_ray(inputs, cfg, out)
    from hnal_ray.score.job import run_score

    return run_score(inputs, cfg, out)


def _as_path(value: TableLike, role: str, scratch: Path, named: dict) -> str:
    """A Parquet path for one input; in-memory tables are written to the scratch folder."""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, Mapping):
        value = pa.table({c: embedding_array(np.asarray(v)) if c == "embedding" and np.ndim(v) == 2 else v
                          for c, v in value.items()})
    if not isinstance(value, pa.Table):
        raise InputError(f"{role}: expected a Parquet path, a pyarrow Table or a mapping of columns, "
                         f"got {type(value).__name__}")
    path = write_parquet(value, scratch / "inputs" / f"{role}.parquet")
    named[str(path)] = f"{role} (in-memory table)"
    return str(path)


def run_loop(config: str | os.PathLike, out: str | os.PathLike, overrides: Sequence[str] = (),
             address: str | None = None) -> Path:
    """`hnal loop`: run (or resume) the active-learning loop of a YAML config with `key=value`
    overrides, on `address`, RAY_ADDRESS or an embedded Ray; returns the report's path."""
    from hnal_ray.cluster.session import ray_session
    from hnal_ray.loop.config import load_loop_config
    from hnal_ray.loop.driver import run_loop as run

    cfg = load_loop_config(config, list(overrides))
    with ray_session(address):
        return run(cfg, out)
