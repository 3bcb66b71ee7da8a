"""The Ray Data feature job on a small real subset: encoder outputs, caching, embeddings out."""
import json

import numpy as np
import pytest
import torch

from hnal_ray.data.emoji import build_emoji_dataset, load_emoji_dataset, subsample_dataset
from hnal_ray.data.encoders import ImageEncoder, TextEncoder
from hnal_ray.data.features import load_features

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]
ray = pytest.importorskip("ray")



def test_feature_job_matches_encoders_and_is_cached(tmp_path, caplog):
    from hnal_ray.cluster.features import extract_features

    build_emoji_dataset(tmp_path / "full")
    subsample_dataset(tmp_path / "full", tmp_path / "data", 24, seed=3)
    meta = extract_features(tmp_path / "data", tmp_path / "feat", actors=2)
    tables = load_emoji_dataset(tmp_path / "data")
    assert meta["images"] == tables.images.num_rows == 24 and meta["captions"] == tables.captions.num_rows
    feats = load_features(tmp_path / "feat")
    assert feats.image_feat.shape == (24, 1280) and feats.text_feat.shape == (meta["captions"], 384)
    # same numbers as the encoders called directly (features are L2-normalised on read)
    images = tables.images.sort_by("image_id")
    direct = ImageEncoder(torch.device("cpu")).encode(images["image"].to_pylist())
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(feats.image_feat, direct, atol=1e-4)
    caps = tables.captions.sort_by("text_id")
    np.testing.assert_allclose(feats.text_feat, TextEncoder(torch.device("cpu")).encode(caps["text"].to_pylist()),
                               atol=1e-4)
    assert np.array_equal(feats.text_owner, caps["image_id"].to_numpy())
    with caplog.at_level("INFO"):
        again = extract_features(tmp_path / "data", tmp_path / "feat", actors=2)
    assert "up to date; skipping" in caplog.text and again == json.loads((tmp_path / "feat" / "meta.json").read_text())


def test_embed_writes_the_score_contract(tmp_path):
    """A trained-checkpoint stand-in (fresh weights) embedded to the `hnal score` input tables."""
    import pyarrow as pa

    from hnal_ray.retrieval.embed import embed_dir
    from hnal_ray.io import embedding_array, read_embeddings, write_parquet
    from hnal_ray.retrieval.model import DualEncoder, ModelConfig
    from hnal_ray.retrieval.training import save_checkpoint

    rng = np.random.default_rng(0)
    write_parquet(pa.table({"image_id": np.arange(5, dtype=np.int64),
                            "embedding": embedding_array(rng.standard_normal((5, 6)))}), tmp_path / "f/images.parquet")
    write_parquet(pa.table({"text_id": np.arange(7, dtype=np.int64), "image_id": np.array([0, 0, 1, 2, 3, 4, 4]),
                            "embedding": embedding_array(rng.standard_normal((7, 4)))}), tmp_path / "f/captions.parquet")
    model = DualEncoder(ModelConfig(image_dim=6, text_dim=4, embed_dim=3, hidden=0))
    (tmp_path / "ck").mkdir()
    save_checkpoint(tmp_path / "ck", model, torch.optim.SGD(model.parameters(), lr=0.1), 0, {"rsum": 1.0},
                    model.state_dict())
    paths = embed_dir(tmp_path / "ck", tmp_path / "f", tmp_path / "e")
    img = read_embeddings(paths["images"], "image_id")
    txt = read_embeddings(paths["captions"], "text_id", "image_id")
    assert img.emb.shape == (5, 3) and txt.emb.shape == (7, 3) and txt.owner.tolist() == [0, 0, 1, 2, 3, 4, 4]
    feats = load_features(tmp_path / "f")
    with torch.no_grad():
        want = model.embed_images(torch.from_numpy(feats.image_feat)).numpy()
    np.testing.assert_allclose(img.emb, want, atol=1e-6)
