"""Frozen-feature tables: what the encoders produce and the retrieval model trains on.

`images.parquet`: image_id, embedding (image features); `captions.parquet`: text_id, image_id,
embedding (text features). Same contract as `hnal score` inputs, so the same validated reader
applies (features are L2-normalised on read).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hnal_ray.io import read_embeddings


@dataclass(frozen=True)
class FeatureSet:
    """image_ids (n_i,) sorted, image_feat (n_i, D_i); text_ids (n_t,) sorted, text_owner, text_feat."""

    image_ids: np.ndarray
    image_feat: np.ndarray
    text_ids: np.ndarray
    text_owner: np.ndarray
    text_feat: np.ndarray

    def subset(self, image_ids: np.ndarray) -> "FeatureSet":
        """The given images (sorted) and all of their texts."""
        keep_i = np.isin(self.image_ids, image_ids)
        keep_t = np.isin(self.text_owner, image_ids)
        return FeatureSet(self.image_ids[keep_i], self.image_feat[keep_i], self.text_ids[keep_t],
                          self.text_owner[keep_t], self.text_feat[keep_t])


    def pairs(self, text_ids: np.ndarray) -> "FeatureSet":
        """The given texts and the images they describe (a paired set of text-image pairs)."""
        keep_t = np.isin(self.text_ids, text_ids)
        keep_i = np.isin(self.image_ids, self.text_owner[keep_t])
        return FeatureSet(self.image_ids[keep_i], self.image_feat[keep_i], self.text_ids[keep_t],
                          self.text_owner[keep_t], self.text_feat[keep_t])

    def texts_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Sorted ids of every text of the given images."""
        return self.text_ids[np.isin(self.text_owner, image_ids)]


def load_features(feature_dir: str | Path) -> FeatureSet:
    d = Path(feature_dir)
    img = read_embeddings(d / "images.parquet", "image_id")
    txt = read_embeddings(d / "captions.parquet", "text_id", "image_id")
    oi, ot = np.argsort(img.ids), np.argsort(txt.ids)
    return FeatureSet(img.ids[oi], img.emb[oi], txt.ids[ot], txt.owner[ot], txt.emb[ot])
