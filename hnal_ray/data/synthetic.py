"""Seeded synthetic embedding tables in the input contract, for the example run, tests and benchmarks."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnal_ray.io import embedding_array, write_parquet


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_embeddings(rng: np.random.Generator, n: int, dim: int, n_clusters: int,
                         spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors around `n_clusters` random centres, and each row's cluster."""
    centres = unit(rng.standard_normal((n_clusters, dim)))
    label = rng.integers(0, n_clusters, n)
    return unit(centres[label] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim) * 3), label


POOL_FILE_ROWS = 1_000_000  # pool rows per file of the pool_images/ directory
POOL_ROW_GROUP = 65536       # rows per row group: readers stream and shard by row group
POOL_SCHEMA = pa.schema([("image_id", pa.int64()), ("embedding", pa.list_(pa.float32()))])


def make_example(out_dir: str | Path, n_images: int = 2000, captions: tuple[int, int] = (1, 5),
                 n_pool: int = 20000, n_pool_texts: int = 5000, dim: int = 64, n_clusters: int = 50,
                 seed: int = 0, file_rows: int = POOL_FILE_ROWS) -> dict[str, Path]:
    """Write paired_images, paired_texts and pool_texts Parquet files and the pool_images/ directory
    (files of `file_rows` rows, row groups of 65,536) to `out_dir`.

    Images cluster into fine categories; each caption is its image plus noise, so hard negatives
    exist (nearby images of the same category). The pool is generated and written one file at a
    time (each from its own seeded stream), so a pool larger than memory can be made. Returns the
    paths by role.
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    centres = unit(rng.standard_normal((n_clusters, dim)))
    emb = around(rng, centres, n_images)
    n_caps = rng.integers(captions[0], captions[1] + 1, n_images)
    owner = np.repeat(np.arange(n_images), n_caps)
    text_emb = unit(emb[owner] + 0.6 * rng.standard_normal((len(owner), dim)) / np.sqrt(dim))
    pool_text_emb = unit(around(rng, centres, n_pool_texts) + 0.6 * rng.standard_normal((n_pool_texts, dim)) / np.sqrt(dim))
    image_ids = np.arange(n_images, dtype=np.int64) * 7 + 3  # sparse, not row numbers
    tables = {
        "paired_images": pa.table({"image_id": image_ids, "embedding": embedding_array(emb)}),
        "paired_texts": pa.table({"text_id": np.arange(len(owner), dtype=np.int64) + 100_000,
                                  "image_id": image_ids[owner], "embedding": embedding_array(text_emb)}),
        "pool_texts": pa.table({"text_id": np.arange(n_pool_texts, dtype=np.int64) + 900_000,
                                "embedding": embedding_array(pool_text_emb)}),
    }
    paths = {role: write_parquet(table, out / f"{role}.parquet") for role, table in tables.items()}
    pool_dir = out / "pool_images"
    pool_dir.mkdir(parents=True, exist_ok=True)
    for i, lo in enumerate(range(0, n_pool, file_rows)):
        part = np.random.default_rng([seed, 1, i])  # its own stream: files do not depend on each other
        tmp = pool_dir / f".part-{i:05d}.parquet.tmp"
        with pq.ParquetWriter(tmp, POOL_SCHEMA) as writer:  # one row group in memory at a time
            for g in range(lo, min(lo + file_rows, n_pool), POOL_ROW_GROUP):
                n = min(POOL_ROW_GROUP, lo + file_rows - g, n_pool - g)
                ids = (np.arange(g, g + n, dtype=np.int64) + n_images) * 7 + 3
                writer.write_table(pa.table({"image_id": ids, "embedding": embedding_array(around(part, centres, n))},
                                            schema=POOL_SCHEMA))
        os.replace(tmp, pool_dir / f"part-{i:05d}.parquet")
    paths["pool_images"] = pool_dir
    return paths


def around(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float = 0.35) -> np.ndarray:
    """(n, d) float32 unit vectors near random ones of the given centres."""
    label = rng.integers(0, len(centres), n)
    dim = centres.shape[1]
    noise = rng.standard_normal((n, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim) * 3)
    return unit(centres[label] + noise)
