"""A real 2-worker Ray Train run on synthetic features: learns, recovers a killed worker, resumes."""
import json

import cloudpickle
import numpy as np
import pyarrow as pa
import pytest
import torch

import faults
from hnal_ray.data.features import load_features
from hnal_ray.io import embedding_array, write_parquet
from hnal_ray.retrieval.model import DualEncoder, ModelConfig
from hnal_ray.retrieval.training import TrainConfig, evaluate, load_best

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]
ray = pytest.importorskip("ray")



def synthetic_features(root, n_images=300, seed=0):
    """Images and 1-3 captions that share an 8-d latent seen through different random maps."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_images, 8))
    image_feat = z @ rng.standard_normal((8, 32)) + 0.3 * rng.standard_normal((n_images, 32))
    caps = rng.integers(1, 4, n_images)
    owner = np.repeat(np.arange(n_images), caps)
    text_feat = z[owner] @ rng.standard_normal((8, 16)) + 0.3 * rng.standard_normal((len(owner), 16))
    write_parquet(pa.table({"image_id": np.arange(n_images, dtype=np.int64),
                            "embedding": embedding_array(image_feat)}), root / "images.parquet")
    write_parquet(pa.table({"text_id": np.arange(len(owner), dtype=np.int64), "image_id": owner.astype(np.int64),
                            "embedding": embedding_array(text_feat)}), root / "captions.parquet")
    return np.arange(n_images)


@pytest.mark.full
def test_fit_learns_recovers_a_killed_worker_and_resumes(tmp_path):
    from hnal_ray.cluster.train import fit

    ids = synthetic_features(tmp_path)
    train_ids, val_ids = ids[:240], ids[240:]
    model_cfg = ModelConfig(image_dim=32, text_dim=16, embed_dim=16, hidden=64)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=3e-3, warmup_epochs=1, num_workers=2, max_failures=1,
                      checkpoint_every=1, model=model_cfg)
    train_texts = load_features(tmp_path).texts_of(train_ids)
    cloudpickle.register_pickle_by_value(faults)  # the Train workers get the faulty loop by value
    res = fit(str(tmp_path), train_texts, val_ids, cfg, str(tmp_path / "runs"), "t",
              loop=faults.dies_once_at_epoch(2, tmp_path / "runs" / ".t.failed-once"))
    assert (tmp_path / "runs" / ".t.failed-once").exists()          # a worker did die
    # ...and training went on from a checkpoint (epoch 1's, or epoch 0's if the controller had not
    # yet registered epoch 1's when the worker group died), not from scratch
    assert res.last["epoch"] == 3 and res.last["resumed_at"] in (1, 2)

    torch.manual_seed(123)
    val = load_features(tmp_path).subset(val_ids)
    random_rsum = evaluate(DualEncoder(model_cfg), val, torch.device("cpu"))["rsum"]
    model, meta = load_best(res.checkpoint)
    trained = evaluate(model, val, torch.device("cpu"))
    assert trained["rsum"] == pytest.approx(meta["best"]["rsum"])   # best.pt holds the best epoch
    assert meta["best"]["rsum"] == max(meta["best"]["rsum"], res.last["best_rsum"])
    assert trained["rsum"] > random_rsum + 100, (trained, random_rsum)

    more = fit(str(tmp_path), train_texts, val_ids, TrainConfig(**{**cfg.__dict__, "epochs": 6}),
               str(tmp_path / "runs"), "t")
    assert more.last["epoch"] == 5 and more.last["resumed_at"] == 4    # picked up after epoch 3
    assert json.loads(json.dumps(more.best))["rsum"] >= meta["best"]["rsum"]


def test_local_mode_fit_persists_resumes_and_is_deterministic(tmp_path):
    """num_workers=0 (Ray Train V2 local mode): the checkpoint lands in the storage path, a longer
    rerun resumes after the last epoch, and the result equals a fresh fit of the same length."""
    from hnal_ray.cluster.train import fit, resolve_workers

    ids = synthetic_features(tmp_path, seed=1)
    model_cfg = ModelConfig(image_dim=32, text_dim=16, embed_dim=16, hidden=64)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=3e-3, warmup_epochs=1, num_workers=0, checkpoint_every=1,
                      model=model_cfg)
    assert resolve_workers(TrainConfig(num_workers="auto")) == 0      # a CPU-only cluster: local mode
    texts = load_features(tmp_path).texts_of(ids[:240])
    first = fit(str(tmp_path), texts, ids[240:], cfg, str(tmp_path / "runs"), "local")
    assert first.checkpoint.startswith(str(tmp_path / "runs" / "local"))
    assert first.last["epoch"] == 2 and first.last["resumed_at"] == 0
    longer = TrainConfig(**{**cfg.__dict__, "epochs": 5})
    resumed = fit(str(tmp_path), texts, ids[240:], longer, str(tmp_path / "runs"), "local")
    assert resumed.last["epoch"] == 4 and resumed.last["resumed_at"] == 3
    fresh = fit(str(tmp_path), texts, ids[240:], longer, str(tmp_path / "runs"), "fresh")
    assert fresh.last["resumed_at"] == 0 and fresh.last["loss"] == resumed.last["loss"]
    assert fresh.best == resumed.best
    val = load_features(tmp_path).subset(ids[240:])
    assert evaluate(load_best(resumed.checkpoint)[0], val, torch.device("cpu"))["rsum"] > 300


def test_train_config_rejects_bad_worker_counts():
    from hnal_ray.config import ConfigError

    for bad in (-1, "two", 1.5):
        with pytest.raises(ConfigError, match="train.num_workers"):
            TrainConfig(num_workers=bad)


def test_weight_average_of_the_last_epochs_is_the_model_kept(tmp_path):
    """model_choice=average: best.pt is the uniform average of the last epochs' weights, with its
    own validation metrics (checked against an average computed here from per-epoch fits)."""
    from hnal_ray.cluster.train import fit

    ids = synthetic_features(tmp_path, seed=2)
    model_cfg = ModelConfig(image_dim=32, text_dim=16, embed_dim=16, hidden=0)
    base = dict(batch_size=32, lr=3e-3, warmup_epochs=1, num_workers=0, checkpoint_every=1, model=model_cfg)
    texts, val_ids = load_features(tmp_path).texts_of(ids[:240]), ids[240:]
    avg = fit(str(tmp_path), texts, val_ids, TrainConfig(epochs=4, model_choice="average", average_epochs=2, **base),
              str(tmp_path / "runs"), "avg")
    assert avg.best["avg_count"] == 2 and avg.best["epoch"] == 3
    weights = []
    for epochs in (3, 4):  # the same seeded run stopped after epoch 2 and after epoch 3: their last weights
        r = fit(str(tmp_path), texts, val_ids, TrainConfig(epochs=epochs, **base), str(tmp_path / "runs"), f"e{epochs}")
        with open(f"{r.checkpoint}/last.pt", "rb") as f:
            weights.append(torch.load(f)["model"])
    got = torch.load(f"{avg.checkpoint}/best.pt")
    for k in got:
        torch.testing.assert_close(got[k], (weights[0][k] + weights[1][k]) / 2)
    val = load_features(tmp_path).subset(val_ids)
    assert evaluate(load_best(avg.checkpoint)[0], val, torch.device("cpu"))["rsum"] == pytest.approx(avg.best["rsum"])


def test_clustered_batches_keep_look_alikes_together_and_split_like_random_ones():
    """batching=clustered: every epoch is still one pass over the pairs (the short tail dropped),
    seeded, the same global batches whatever the worker count, and far purer than random batches."""
    from hnal_ray.retrieval.training import epoch_batches

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 12, 500)
    for epoch in range(3):
        one = epoch_batches(500, 40, 7, epoch, 0, 1, groups)
        flat = np.concatenate(one)
        assert len(one) == 12 and len(flat) == 480 and len(np.unique(flat)) == 480
        assert all(np.array_equal(a, b) for a, b in zip(one, epoch_batches(500, 40, 7, epoch, 0, 1, groups)))
        halves = [epoch_batches(500, 40, 7, epoch, r, 2, groups) for r in (0, 1)]
        assert all(np.array_equal(b, np.concatenate([h0, h1])) for b, h0, h1 in zip(one, *halves))
        mixed = epoch_batches(500, 40, 7, epoch, 0, 1)
        assert np.mean([len(np.unique(groups[b])) for b in one]) <= 2.5 < np.mean([len(np.unique(groups[b]))
                                                                                for b in mixed])
    assert not np.array_equal(np.concatenate(epoch_batches(500, 40, 7, 0, 0, 1, groups)),
                              np.concatenate(epoch_batches(500, 40, 7, 1, 0, 1, groups)))


def test_pair_groups_are_kmeans_of_the_images_and_a_clustered_fit_learns(tmp_path):
    from hnal_ray.cluster.train import fit
    from hnal_ray.retrieval.training import pair_groups
    from hnal_ray.score.kmeans import fit_centres
    from hnal_ray.score.reference import dense_assign

    ids = synthetic_features(tmp_path, seed=3)
    data = load_features(tmp_path)
    train = data.pairs(data.texts_of(ids[:240]))
    owner_row = np.searchsorted(train.image_ids, train.text_owner)
    got = pair_groups(train, owner_row, 32, 5)
    unit = train.image_feat / np.linalg.norm(train.image_feat, axis=1, keepdims=True)
    centres = fit_centres(unit.astype(np.float32), len(owner_row) // 32, 5)   # the same seeded fit
    want = dense_assign(unit.astype(np.float32), centres)[owner_row]          # the float64 reference's labels
    assert np.array_equal(got, want) and len(np.unique(got)) > 1
    cfg = TrainConfig(epochs=6, batch_size=32, lr=3e-3, warmup_epochs=1, num_workers=0, batching="clustered",
                      model=ModelConfig(image_dim=32, text_dim=16, embed_dim=16, hidden=64))
    res = fit(str(tmp_path), data.texts_of(ids[:240]), ids[240:], cfg, str(tmp_path / "runs"), "clustered")
    assert evaluate(load_best(res.checkpoint)[0], data.subset(ids[240:]), torch.device("cpu"))["rsum"] > 300
    from hnal_ray.config import ConfigError
    with pytest.raises(ConfigError, match="train.batching"):
        TrainConfig(batching="hard")
