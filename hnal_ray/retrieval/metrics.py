"""Recall@K for image->text and text->image retrieval, with exact FAISS inner-product search."""
from __future__ import annotations

import numpy as np


def _ranks_of_first_hit(query: np.ndarray, keys: np.ndarray, hit: callable, max_k: int) -> np.ndarray:
    """Per query, the 0-based rank of the first correct key within the top max_k (max_k if none)."""
    import faiss

    _, idx = faiss.knn(np.ascontiguousarray(query, np.float32), np.ascontiguousarray(keys, np.float32),
                       min(max_k, len(keys)), metric=faiss.METRIC_INNER_PRODUCT)
    ok = hit(idx)
    return np.where(ok.any(axis=1), ok.argmax(axis=1), max_k)


def recall_at_k(image_emb: np.ndarray, image_ids: np.ndarray, text_emb: np.ndarray, text_owner: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent, both ways, plus rsum (sum of the six) and r1_sum (i2t R@1 + t2i R@1).

    image_emb: (n_i, d) unit vectors with image_ids (n_i,); text_emb: (n_t, d) with text_owner
    (n_t,), the id of the image each text describes (identical-image items were merged upstream,
    so a text's correct image is its owner). i2t: an image is a hit at K if any of its texts is in
    its top K; t2i: a text is a hit at K if its image is in its top K.
    """
    max_k = max(ks)
    i2t = _ranks_of_first_hit(image_emb, text_emb, lambda idx: text_owner[idx] == image_ids[:, None], max_k)
    t2i = _ranks_of_first_hit(text_emb, image_emb, lambda idx: image_ids[idx] == text_owner[:, None], max_k)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float((i2t < k).mean())
        out[f"t2i_R@{k}"] = 100.0 * float((t2i < k).mean())
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    out["r1_sum"] = out["i2t_R@1"] + out["t2i_R@1"]
    return out
