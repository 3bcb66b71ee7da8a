"""Model embeddings out, in the `hnal score` input contract, so selection scores with the current model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from hnal_ray.data.features import FeatureSet, load_features
from hnal_ray.io import embedding_array, write_parquet
from hnal_ray.retrieval.training import embed, embed_images, load_best


def embed_features(checkpoint: str | Path, feats: FeatureSet, device: torch.device | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings (n_i, d), text embeddings (n_t, d)) of a feature set, unit float32."""
    device = device or torch.device("cpu")
    model, _ = load_best(checkpoint)
    model.to(device)
    return embed_images(model, feats, device), embed(model, feats.text_feat, "text", device)


def write_embeddings(feats: FeatureSet, image_emb: np.ndarray, text_emb: np.ndarray, out_dir: str | Path,
                     image_ids: np.ndarray | None = None, text_image_ids: np.ndarray | None = None
                     ) -> dict[str, Path]:
    """out_dir/images.parquet (image_id, embedding) and out_dir/captions.parquet (text_id,
    image_id, embedding), restricted to the given images / the texts of the given images."""
    out = Path(out_dir)
    keep_i = np.ones(len(feats.image_ids), bool) if image_ids is None else np.isin(feats.image_ids, image_ids)
    keep_t = (np.ones(len(feats.text_ids), bool) if text_image_ids is None
              else np.isin(feats.text_owner, text_image_ids))
    images = pa.table({"image_id": feats.image_ids[keep_i], "embedding": embedding_array(image_emb[keep_i])})
    texts = pa.table({"text_id": feats.text_ids[keep_t], "image_id": feats.text_owner[keep_t],
                      "embedding": embedding_array(text_emb[keep_t])})
    return {"images": write_parquet(images, out / "images.parquet"),
            "captions": write_parquet(texts, out / "captions.parquet")}


def embed_dir(checkpoint: str | Path, feature_dir: str | Path, out_dir: str | Path,
              device: torch.device | None = None) -> dict[str, Path]:
    """`hnal embed`: every image and caption of a feature directory, embedded with a checkpoint."""
    model, _ = load_best(checkpoint)
    feats = load_features(feature_dir, image_maps=model.image_block is not None)
    img, txt = embed_features(checkpoint, feats, device)
    return write_embeddings(feats, img, txt, out_dir)
