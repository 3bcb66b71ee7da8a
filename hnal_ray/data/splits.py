"""The train/val/test split of a data set folder (`split.parquet`: image_id, split): reading it, and
the seeded group-preserving assignment every builder uses."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def split_ids(data_dir: str | Path, split: str) -> np.ndarray:
    """Sorted image ids of one split (train/val/test) of a data set's split.parquet."""
    t = pq.read_table(Path(data_dir) / "split.parquet")
    ids = t["image_id"].to_numpy()[np.asarray(t["split"].to_pylist()) == split]
    return np.sort(ids)


SPLITS = ("train", "val", "test")


def assign_split(groups: Iterable[str], seed: int, fractions: tuple[float, float, float]) -> list[str]:
    """Seeded hash split by group: every image of a group lands in the same one of SPLITS."""
    cuts = np.cumsum(fractions) / sum(fractions)
    out = []
    for group in groups:
        digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        out.append(SPLITS[min(int(np.searchsorted(cuts, u, side="right")), len(SPLITS) - 1)])
    return out
