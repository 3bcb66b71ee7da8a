"""The train/val/test split of a data set folder (`split.parquet`: image_id, split)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def split_ids(data_dir: str | Path, split: str) -> np.ndarray:
    """Sorted image ids of one split (train/val/test) of a data set's split.parquet."""
    t = pq.read_table(Path(data_dir) / "split.parquet")
    ids = t["image_id"].to_numpy()[np.asarray(t["split"].to_pylist()) == split]
    return np.sort(ids)
