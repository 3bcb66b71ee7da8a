"""Validate the inputs of a scoring job on the driver (ids only) and cut it into shards."""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.io import InputError, check_unique, parquet_files, read_embeddings, read_ids, row_group_starts
from hnal_ray.score.worker import Anchors, ShardSpec


@dataclass(frozen=True)
class SideTables:
    """Which input plays which role on a side (see hnal_ray.score.thresholds for anchor/key)."""

    anchor_path: str
    anchor_id: str
    anchor_group: str | None
    key_path: str
    key_id: str
    key_group: str | None
    pool_path: str
    pool_id: str


def side_tables(inputs: ScoreInputs, side: str) -> SideTables:
    if side == "image":
        return SideTables(inputs.paired_texts, "text_id", "image_id", inputs.paired_images, "image_id", None,
                          inputs.pool, "image_id")
    return SideTables(inputs.paired_images, "image_id", None, inputs.paired_texts, "text_id", "image_id",
                      inputs.pool, "text_id")


@dataclass(frozen=True)
class Plan:
    tables: SideTables
    anchors: Anchors
    n_keys: int
    n_pool: int
    n_paired_images: int
    n_paired_texts: int
    dim: int


def check_inputs(inputs: ScoreInputs, cfg: ScoreConfig) -> Plan:
    """Every check that needs the whole table, done on ids; embeddings are checked where read."""
    t = side_tables(inputs, cfg.side)
    image_parts = read_ids(inputs.paired_images, "image_id")
    check_unique(image_parts, "image_id")
    text_parts = read_ids(inputs.paired_texts, "text_id")
    check_unique(text_parts, "text_id")
    image_ids = np.concatenate([i for _, i in image_parts])
    if len(image_ids) == 0:
        raise InputError(f"{inputs.paired_images}: the paired image table has no rows")
    n_texts = sum(len(i) for _, i in text_parts)
    if n_texts == 0 and cfg.uses_thresholds:
        raise InputError(f"{inputs.paired_texts}: the paired text table has no rows")
    known = np.sort(image_ids)
    for f, owners in read_ids(inputs.paired_texts, "image_id"):
        pos = np.minimum(np.searchsorted(known, owners), len(known) - 1)
        bad = np.flatnonzero(known[pos] != owners)
        if len(bad):
            r = int(bad[0])
            raise InputError(f"{f}: column 'image_id' row {r}: owner image {owners[r]} is not among the "
                             f"paired images ({inputs.paired_images})")
    pool_parts = read_ids(inputs.pool, t.pool_id)
    check_unique(pool_parts, t.pool_id)
    n_pool = sum(len(i) for _, i in pool_parts)
    if n_pool == 0:
        raise InputError(f"{inputs.pool}: the pool is empty")
    paired_same_kind = np.sort(image_ids if cfg.side == "image" else np.concatenate([i for _, i in text_parts]))
    for f, ids in pool_parts:
        hit = np.flatnonzero(np.isin(ids, paired_same_kind))
        if len(hit):
            r = int(hit[0])
            raise InputError(f"{f}: column '{t.pool_id}' row {r}: id {ids[r]} is already paired")
    if cfg.budget > n_pool:
        raise InputError(f"{inputs.pool}: --budget {cfg.budget} is larger than the pool ({n_pool} rows)")
    anchors_table = read_embeddings(t.anchor_path, t.anchor_id, t.anchor_group)
    order = np.argsort(anchors_table.ids, kind="stable")
    group = anchors_table.owner if t.anchor_group else anchors_table.ids
    anchors = Anchors(anchors_table.ids[order], group[order], anchors_table.emb[order])
    n_keys = sum(len(i) for _, i in (image_parts if cfg.side == "image" else text_parts))
    dim = anchors_table.dim if len(anchors_table) else read_embeddings(t.key_path, t.key_id, t.key_group).dim
    return Plan(t, anchors, n_keys, n_pool, len(image_ids), n_texts, dim)


def cut_rows(group_starts: np.ndarray, shard_rows: int) -> list[tuple[int, int]]:
    """Contiguous row ranges covering the table, each at most `shard_rows` rows (and at least one),
    cut at row-group boundaries (`group_starts`: each group's first row, then the total) so no two
    shards decode the same group; a group larger than `shard_rows` is split evenly."""
    out, lo = [], 0
    n = int(group_starts[-1])
    bounds = group_starts[1:]
    while lo < n:
        # the furthest group boundary within shard_rows of lo
        i = int(np.searchsorted(bounds, lo + shard_rows, side="right")) - 1
        hi = int(bounds[i]) if i >= 0 and bounds[i] > lo else 0
        if hi <= lo:  # one group longer than shard_rows: even pieces of it
            end = int(bounds[np.searchsorted(bounds, lo, side="right")])
            pieces = -(-(end - lo) // shard_rows)
            hi = lo + -(-(end - lo) // pieces)
        out.append((lo, hi))
        lo = hi
    return out


def pool_shards(plan: Plan, shard_rows: int) -> list[ShardSpec]:
    t = plan.tables
    return [ShardSpec(i, t.pool_path, t.pool_id, None, r, plan.dim)
            for i, r in enumerate(cut_rows(row_group_starts(t.pool_path), shard_rows))]


def key_shards(plan: Plan, shard_rows: int) -> list[ShardSpec]:
    t = plan.tables
    return [ShardSpec(i, t.key_path, t.key_id, t.key_group, r, plan.dim)
            for i, r in enumerate(cut_rows(row_group_starts(t.key_path), shard_rows))]


def load_keys_sorted(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All keys (ids, group, emb) sorted by id, for the driver-side mini-batch and core-set paths."""
    t = plan.tables
    keys = read_embeddings(t.key_path, t.key_id, t.key_group, dim=plan.dim)
    order = np.argsort(keys.ids, kind="stable")
    group = keys.owner if t.key_group else keys.ids
    return keys.ids[order], group[order], keys.emb[order]


def input_fingerprint(inputs: ScoreInputs) -> list[dict]:
    """Path, size and a BLAKE2b digest of the bytes of every input file: a changed input invalidates
    a finished run even when its size and timestamp were kept (`cp -p`, `rsync -a`, untar)."""
    out = []
    for role, path in (("paired_images", inputs.paired_images), ("paired_texts", inputs.paired_texts),
                       ("pool", inputs.pool)):
        try:
            files = parquet_files(path)  # the files the readers read, no more, no fewer
        except InputError:
            files = []
        for f in files:
            if f.exists():
                st = f.stat()
                out.append({"role": role, "file": str(f.resolve()), "bytes": st.st_size,
                            "blake2b": file_digest(str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                                   st.st_ino)})
    return out


@functools.lru_cache(maxsize=1024)
def file_digest(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """BLAKE2b-128 of a file's bytes (~1 GB/s), remembered in this process while the file's size,
    times and inode are unchanged (any rewrite changes its ctime)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
