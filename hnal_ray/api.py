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

from hnal_ray.config import ConfigError, ScoreConfig, ScoreInputs
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
           strategy: str = "hard-negative", *, out: str | os.PathLike | None = None, **options) -> Selection:
    """Score `pool` against the paired set and select the top `budget` items (`hnal score`).

    `options` are `ScoreConfig`'s fields (the `hnal score` options, same names with underscores:
    weight, k, threshold_batch, side, seed, shards, clusters, quota, within, ...; see
    `help(hnal_ray.config.ScoreConfig)` or `hnal score --help`), with the same defaults.
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
    from hnal_ray.cluster.dispatch import run_score_job

    known = {f.name for f in dataclasses.fields(ScoreConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"select: unknown option(s) {unknown} (options are ScoreConfig's fields: {sorted(known)})")
    cfg = ScoreConfig(budget=budget, strategy=strategy, **options)
    scratch = Path(tempfile.mkdtemp(prefix="hnal-select-"))
    try:
        named = {}
        paths = {role: _as_path(value, role, scratch, named) for role, value in
                 (("paired_images", paired_images), ("paired_texts", paired_texts), ("pool", pool))}
        target = Path(out) if out is not None else scratch / "out"
        try:
            summary = run_score_job(ScoreInputs(**paths), cfg, target)
        except InputError as exc:
            msg = str(exc)
            for tmp, label in named.items():
                msg = msg.replace(tmp, label)
            raise InputError(msg) from None
        return Selection(pq.read_table(target / "selection.parquet"), pq.read_table(target / "scores.parquet"),
                         summary)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
