"""Seeded synthetic embedding tables in the input contract, for the example run, tests and benchmarks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from hnal_ray.io import embedding_array, write_parquet


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_embeddings(rng: np.random.Generator, n: int, dim: int, n_clusters: int,
                         spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors around `n_clusters` random centres, and each row's cluster."""
    centres = unit(rng.standard_normal((n_clusters, dim)))
    label = rng.integers(0, n_clusters, n)
    return unit(centres[label] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim) * 3), label


def make_example(out_dir: str | Path, n_images: int = 2000, captions: tuple[int, int] = (1, 5),
                 n_pool: int = 20000, n_pool_texts: int = 5000, dim: int = 64, n_clusters: int = 50,
                 seed: int = 0) -> dict[str, Path]:
    """Write paired_images, paired_texts, pool_images and pool_texts Parquet files to `out_dir`.

    Images cluster into fine categories; each caption is its image plus noise, so hard negatives
    exist (nearby images of the same category). Returns the paths by role.
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    emb, _ = clustered_embeddings(rng, n_images + n_pool, dim, n_clusters)
    n_caps = rng.integers(captions[0], captions[1] + 1, n_images)
    owner = np.repeat(np.arange(n_images), n_caps)
    text_emb = unit(emb[owner] + 0.6 * rng.standard_normal((len(owner), dim)) / np.sqrt(dim))
    pool_owner = rng.integers(n_images, n_images + n_pool, n_pool_texts)
    pool_text_emb = unit(emb[pool_owner] + 0.6 * rng.standard_normal((n_pool_texts, dim)) / np.sqrt(dim))
    image_ids = np.arange(n_images + n_pool, dtype=np.int64) * 7 + 3  # sparse, not row numbers
    paths = {
        "paired_images": pa.table({"image_id": image_ids[:n_images], "embedding": embedding_array(emb[:n_images])}),
        "paired_texts": pa.table({"text_id": np.arange(len(owner), dtype=np.int64) + 100_000,
                                  "image_id": image_ids[owner], "embedding": embedding_array(text_emb)}),
        "pool_images": pa.table({"image_id": image_ids[n_images:], "embedding": embedding_array(emb[n_images:])}),
        "pool_texts": pa.table({"text_id": np.arange(n_pool_texts, dtype=np.int64) + 900_000,
                                "embedding": embedding_array(pool_text_emb)}),
    }
    return {role: write_parquet(table, out / f"{role}.parquet") for role, table in paths.items()}
