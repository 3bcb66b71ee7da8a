"""Seeded test fixtures: exact-arithmetic embeddings and the dense end-to-end reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnal_ray.score.baselines import random_keys
from hnal_ray.io import embedding_array
from hnal_ray.score.reference import dense_scores, dense_select, dense_thresholds


def quantized(rng: np.random.Generator, n: int, d: int, levels: int = 2) -> np.ndarray:
    """Small multiples of 1/4: every dot product and partial sum is exact in float32, ties abound."""
    return (rng.integers(-levels, levels + 1, (n, d)) / 4).astype(np.float32)


def signs(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    """+-1 vectors: for d = 16 or 64 their L2 normalisation is exact, so file-level runs stay exact."""
    return rng.choice(np.array([-1.0, 1.0], np.float32), (n, d))


def paired_set(rng, n_images: int, max_captions: int, d: int, make=quantized):
    """image_ids sorted, (n_i, d) images; texts in text_id order with owners (multi-caption)."""
    image_ids = np.sort(rng.choice(10 * n_images + 10, n_images, replace=False)).astype(np.int64)
    caps = rng.integers(0, max_captions + 1, n_images)
    caps[0] = max(caps[0], 1)
    owner = np.repeat(image_ids, caps)
    return image_ids, make(rng, n_images, d), owner, make(rng, len(owner), d)


def write_inputs(root: Path, rng, n_images=30, max_captions=3, n_pool=40, d=16, side="image"):
    """Sign-vector input tables under root; returns (paths dict, raw arrays dict)."""
    image_ids, image_emb, owner, text_emb = paired_set(rng, n_images, max_captions, d, signs)
    text_ids = np.arange(len(owner), dtype=np.int64) * 3 + 1
    perm_t = rng.permutation(len(owner))  # rows in files need not be sorted by id
    pool_emb = signs(rng, n_pool, d)
    pool_col = "image_id" if side == "image" else "text_id"
    taken = set(image_ids.tolist()) if side == "image" else set(text_ids.tolist())
    pool_ids = np.array(sorted(set(range(100_000, 100_000 + 3 * n_pool)) - taken)[:n_pool], dtype=np.int64)
    perm_u = rng.permutation(n_pool)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"paired_images": root / "paired_images.parquet", "paired_texts": root / "paired_texts.parquet",
             "pool": root / "pool.parquet"}
    pq.write_table(pa.table({"image_id": image_ids, "embedding": embedding_array(image_emb)}), paths["paired_images"])
    pq.write_table(pa.table({"text_id": text_ids[perm_t], "image_id": owner[perm_t],
                             "embedding": embedding_array(text_emb[perm_t])}), paths["paired_texts"])
    pq.write_table(pa.table({pool_col: pool_ids[perm_u], "embedding": embedding_array(pool_emb[perm_u])}),
                   paths["pool"], row_group_size=7)
    raw = dict(image_ids=image_ids, image_emb=image_emb, text_ids=text_ids, owner=owner, text_emb=text_emb,
               pool_ids=pool_ids, pool_emb=pool_emb)
    return paths, raw


def _unit(x):
    return x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)


def dense_run(raw: dict, side: str, weight: str, k: int, budget: int, batch=None, seed=0, strategy="hard-negative"):
    """Dense reference of a whole `hnal score` run: (selected ids, {pool id: score})."""
    img, txt, pool = _unit(raw["image_emb"]), _unit(raw["text_emb"]), _unit(raw["pool_emb"])
    if strategy == "random":
        keys = random_keys(raw["pool_ids"], seed)
        return dense_select(raw["pool_ids"], keys, np.zeros(len(keys)), budget), dict(zip(raw["pool_ids"], keys))
    th = dense_thresholds(txt, raw["owner"], img, raw["image_ids"], k, side, batch, seed)
    scores, margin = dense_scores(pool, txt if side == "image" else img, th, weight)
    return dense_select(raw["pool_ids"], scores, margin, budget), dict(zip(raw["pool_ids"].tolist(), scores))
