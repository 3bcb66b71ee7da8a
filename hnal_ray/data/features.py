"""Frozen-feature tables: what the encoders produce and the retrieval model trains on.

`images.parquet`: image_id, embedding (image features); `captions.parquet`: text_id, image_id,
embedding (text features). Same contract as `hnal score` inputs, so the same validated reader
applies (features are L2-normalised on read).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from hnal_ray.io import InputError, embedding_array, read_embeddings, write_json, write_parquet


@dataclass(frozen=True)
class FeatureSet:
    """image_ids (n_i,) sorted, image_feat (n_i, D_i); text_ids (n_t,) sorted, text_owner, text_feat.

    image_maps (n_i, 49, 320) float16, only for a model that trains the image encoder's last stage
    (data/image_maps.py), and image_pre, that stage's frozen pre-activations (with_image_pre)."""

    image_ids: np.ndarray
    image_feat: np.ndarray
    text_ids: np.ndarray
    text_owner: np.ndarray
    text_feat: np.ndarray
    image_maps: np.ndarray | None = None
    image_pre: np.ndarray | None = None

    def _take(self, keep_i: np.ndarray, keep_t: np.ndarray) -> "FeatureSet":
        maps, pre = (None if a is None else a[keep_i] for a in (self.image_maps, self.image_pre))
        return FeatureSet(image_ids=self.image_ids[keep_i], image_feat=self.image_feat[keep_i],
                          text_ids=self.text_ids[keep_t], text_owner=self.text_owner[keep_t],
                          text_feat=self.text_feat[keep_t], image_maps=maps, image_pre=pre)

    def subset(self, image_ids: np.ndarray) -> "FeatureSet":
        """The given images (sorted) and all of their texts."""
        return self._take(np.isin(self.image_ids, image_ids), np.isin(self.text_owner, image_ids))

    def pairs(self, text_ids: np.ndarray) -> "FeatureSet":
        """The given texts and the images they describe (a paired set of text-image pairs)."""
        keep_t = np.isin(self.text_ids, text_ids)
        return self._take(np.isin(self.image_ids, self.text_owner[keep_t]), keep_t)

    def texts_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Sorted ids of every text of the given images."""
        return self.text_ids[np.isin(self.text_owner, image_ids)]

    def with_texts(self, text_ids: np.ndarray, text_owner: np.ndarray, text_feat: np.ndarray) -> "FeatureSet":
        """These texts added (new ids, e.g. captions a person wrote for pool images); sorted by id."""
        if np.isin(text_ids, self.text_ids).any():
            raise ValueError(f"text ids {text_ids[np.isin(text_ids, self.text_ids)][:5].tolist()} exist already")
        ids = np.concatenate([self.text_ids, text_ids])
        order = np.argsort(ids, kind="stable")
        return dataclasses.replace(self, text_ids=ids[order],
                                   text_owner=np.concatenate([self.text_owner, text_owner])[order],
                                   text_feat=np.concatenate([self.text_feat, text_feat.astype(self.text_feat.dtype)])[order])

    def with_image_pre(self, block, batch: int = 256) -> "FeatureSet":
        """This set with the frozen part of `block` (retrieval.model.ConvHeadLoRA) computed once per
        image in float32 (250 KB an image), so that training pays only for the low-rank update."""
        import torch

        if self.image_maps is None:
            raise ValueError("with_image_pre needs image_maps (load_features(..., image_maps=True))")
        maps = np.asarray(self.image_maps)  # float16, read once from the memory map
        pre = np.empty((*maps.shape[:2], block.weight.shape[0]), np.float32)
        for lo in range(0, len(pre), batch):
            pre[lo:lo + batch] = block.frozen_pre(torch.from_numpy(maps[lo:lo + batch])
                                                  .to(block.weight.device)).cpu().numpy()
        return dataclasses.replace(self, image_maps=maps, image_pre=pre)


def load_features(feature_dir: str | Path, extra_texts: tuple[str, ...] = (), image_maps: bool = False) -> FeatureSet:
    """The feature folder's tables, plus the caption tables in `extra_texts` (text_id, image_id,
    embedding: annotated captions of a run); `image_maps`: with the cached last-stage inputs
    (memory-mapped) for a model that trains the image encoder's last stage."""
    d = Path(feature_dir)
    img = read_embeddings(d / "images.parquet", "image_id")
    txt = read_embeddings(d / "captions.parquet", "text_id", "image_id")
    oi, ot = np.argsort(img.ids), np.argsort(txt.ids)
    maps = None
    if image_maps:
        from hnal_ray.data.image_maps import load_image_maps

        maps = load_image_maps(d, img.ids[oi])
    feats = FeatureSet(img.ids[oi], img.emb[oi], txt.ids[ot], txt.owner[ot], txt.emb[ot], image_maps=maps)
    for path in extra_texts:
        more = read_embeddings(path, "text_id", "image_id")
        feats = feats.with_texts(more.ids, more.owner, more.emb)
    return feats


def check_feature_dir(out: Path) -> None:
    """A feature folder is written only when new, empty or written by the feature step (meta.json)."""
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise InputError(f"{out}: exists and was not written by the feature step (no meta.json); "
                         f"it is never overwritten: choose another features folder")


def copy_precomputed(data_dir: str | Path, out: str | Path) -> dict:
    """A data folder of precomputed embeddings becomes the feature folder as it is (no encoder)."""
    data_dir, out = Path(data_dir), Path(out)
    h = hashlib.sha256(b"precomputed")
    for name in ("images.parquet", "captions.parquet"):
        h.update((data_dir / name).read_bytes())
    key = h.hexdigest()[:16]
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("cache_key") == key:
        return json.loads(meta_path.read_text())
    images = pq.read_table(data_dir / "images.parquet", columns=["image_id", "embedding"])
    captions = pq.read_table(data_dir / "captions.parquet", columns=["text_id", "image_id", "embedding"])
    for name, table in (("images.parquet", images), ("captions.parquet", captions)):
        # the same float32 list type the encoders write
        emb = embedding_array(np.asarray(table["embedding"].to_pylist(), np.float32))
        write_parquet(table.set_column(table.schema.get_field_index("embedding"), "embedding", emb),
                      out / name, row_group_size=4096)
    meta = {"cache_key": key, "encoders": "precomputed", "images": images.num_rows, "captions": captions.num_rows}
    write_json(meta, meta_path)
    return meta
