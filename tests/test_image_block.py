"""Training the image encoder's last stage (train.model.image_block_rank): the cached maps against
the real encoder, the low-rank block against the frozen features it starts from, and a real fit."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hnal_ray.data.features import load_features
from hnal_ray.data.image_maps import extract_image_maps, load_image_maps, load_last_stage
from hnal_ray.data.importers import import_data
from hnal_ray.retrieval.model import ConvHeadLoRA, DualEncoder, ModelConfig
from hnal_ray.retrieval.training import TrainConfig, embed_images, evaluate, load_best
from imagedata import make_imagefolder

pytestmark = [pytest.mark.ray, pytest.mark.full, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from hnal_ray.cluster.features import extract_features

    root = tmp_path_factory.mktemp("block")
    import_data(make_imagefolder(root / "src", 40, with_split=True), root / "data")
    extract_features(root / "data", root / "feat", actors=1)
    extract_image_maps(root / "data", root / "feat", threads=1)
    return root


def test_the_block_starts_as_the_frozen_encoder_and_the_maps_are_cached(folder):
    feats = load_features(folder / "feat", image_maps=True)
    assert feats.image_maps.shape == (40, 49, 320) and feats.image_maps.dtype == np.float16
    block = ConvHeadLoRA(rank=4)
    block.load_frozen(load_last_stage(folder / "feat"))
    with torch.no_grad():
        got = block(torch.from_numpy(np.asarray(feats.image_maps))).numpy()
    # the feature tables (frozen encoder, pooled, L2-normalised) up to the float16 maps' rounding
    np.testing.assert_allclose(got, feats.image_feat, atol=2e-3)
    assert np.abs(got - feats.image_feat).max() < 0.05 * np.abs(feats.image_feat).max()
    # the precomputed frozen part gives the same output as computing it per batch, after an update
    with torch.no_grad():
        block.up.normal_()
        maps = torch.from_numpy(np.asarray(feats.image_maps[:8]))
        pre = torch.from_numpy(feats.subset(feats.image_ids[:8]).with_image_pre(block).image_pre)
        np.testing.assert_allclose(block(maps, pre).numpy(), block(maps).numpy(), atol=2e-3)
        assert np.abs(block(maps).numpy() - feats.image_feat[:8]).max() > 0.01  # the update does change it
    # a subset keeps maps aligned with ids
    sub = load_image_maps(folder / "feat", feats.image_ids[[3, 17]])
    np.testing.assert_array_equal(sub, np.asarray(feats.image_maps)[[3, 17]])
    # cached: a second extraction is skipped (same meta, file untouched)
    before = (folder / "feat" / "image_maps" / "maps.npy").stat().st_mtime_ns
    meta = extract_image_maps(folder / "data", folder / "feat")
    assert meta == json.loads((folder / "feat" / "image_maps" / "meta.json").read_text())
    assert (folder / "feat" / "image_maps" / "maps.npy").stat().st_mtime_ns == before


def test_a_fit_trains_the_block_and_every_reader_uses_it(folder, capsys):
    from hnal_ray.cluster.train import fit

    split = pq.read_table(folder / "data" / "split.parquet").to_pydict()
    train_ids = np.array([i for i, s in zip(split["image_id"], split["split"]) if s == "train"])
    val_ids = np.array([i for i, s in zip(split["image_id"], split["split"]) if s != "train"])
    feats = load_features(folder / "feat", image_maps=True)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=3e-3, warmup_epochs=1, num_workers=0, checkpoint_every=1,
                      model=ModelConfig(embed_dim=32, hidden=0, image_block_rank=4))
    res = fit(str(folder / "feat"), feats.texts_of(train_ids), val_ids, cfg, str(folder / "runs"), "block")
    model, meta = load_best(res.checkpoint)
    assert meta["model"]["image_block_rank"] == 4 and model.image_block is not None
    assert model.image_block.up.abs().max() > 0                               # the update learned something
    torch.testing.assert_close(model.image_block.weight, load_last_stage(folder / "feat")["weight"])  # frozen
    # the reported validation rsum is what the saved model gets, with the maps computed per batch
    val = feats.subset(val_ids)
    assert evaluate(model, val, torch.device("cpu"))["rsum"] == pytest.approx(res.best["rsum"], abs=0.2)
    # `hnal embed` goes through the trained stage too (it loads the maps for such a checkpoint)
    from hnal_ray.io import read_embeddings
    from hnal_ray.retrieval.embed import embed_dir

    out = read_embeddings(embed_dir(res.checkpoint, folder / "feat", folder / "emb")["images"], "image_id")
    np.testing.assert_allclose(out.emb[np.argsort(out.ids)], embed_images(model, feats, torch.device("cpu")), atol=1e-5)
    # and `hnal eval`
    from hnal_ray.cli import main

    capsys.readouterr()
    assert main(["eval", "--checkpoint", res.checkpoint, "--data", str(folder / "data"), "--features",
                 str(folder / "feat"), "--split", "val"]) == 0
    val_all = feats.subset(np.array([i for i, s in zip(split["image_id"], split["split"]) if s == "val"]))
    assert json.loads(capsys.readouterr().out)["rsum"] == pytest.approx(evaluate(model, val_all, torch.device("cpu"))["rsum"])
    with pytest.raises(ValueError, match="image_maps"):
        embed_images(model, load_features(folder / "feat").subset(val_ids), torch.device("cpu"))
    # a frozen-feature model of the same shape gives other embeddings: the block is in the path
    plain = DualEncoder(ModelConfig(embed_dim=32, hidden=0))
    plain.image_head.load_state_dict(model.image_head.state_dict())
    assert not np.allclose(embed_images(plain, val, torch.device("cpu")), embed_images(model, val, torch.device("cpu")),
                           atol=1e-3)
