"""Known-answer tests for the loss and for Recall@K against a brute-force numpy reference."""
import numpy as np
import pytest
import torch

from hnal_ray.retrieval.loss import vse_loss
from hnal_ray.retrieval.metrics import recall_at_k
from hnal_ray.retrieval.model import DualEncoder, ModelConfig


def brute_recall(img, image_ids, txt, owner, k):
    s = img @ txt.T
    i2t = np.mean([any(owner[j] == image_ids[i] for j in np.argsort(-s[i], kind="stable")[:k])
                   for i in range(len(img))])
    t2i = np.mean([image_ids[np.argsort(-s[:, j], kind="stable")[:k]].tolist().count(owner[j]) > 0
                   for j in range(len(txt))])
    return 100 * i2t, 100 * t2i


def test_recall_known_ranks():
    # 3 images on axes; texts placed so their correct image sits at rank 1, 2 and 3
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[1, .1, 0], [.9, 0, .5], [.8, .5, .1]], np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ids, owner = np.array([10, 20, 30]), np.array([10, 30, 30])
    r = recall_at_k(img, ids, txt, owner, ks=(1, 2, 3))
    assert r["t2i_R@1"] == pytest.approx(100 / 3) and r["t2i_R@2"] == pytest.approx(200 / 3)
    assert r["t2i_R@3"] == 100
    assert r["i2t_R@1"] == pytest.approx(200 / 3)  # images 10 and 30 hit; 20 owns no text: never a hit
    assert r["rsum"] == pytest.approx(sum(v for k, v in r.items() if "@" in k))


@pytest.mark.parametrize("seed", range(5))
def test_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((40, 8)).astype(np.float32)
    ids = np.arange(40) * 2
    owner = rng.choice(ids, 90)
    txt = rng.standard_normal((90, 8)).astype(np.float32)
    r = recall_at_k(img, ids, txt, owner)
    for k in (1, 5, 10):
        i2t, t2i = brute_recall(img, ids, txt, owner, k)
        assert r[f"i2t_R@{k}"] == pytest.approx(i2t) and r[f"t2i_R@{k}"] == pytest.approx(t2i)


def test_vse_loss_known_values():
    img = torch.eye(2)
    txt = torch.eye(2)
    owner = torch.tensor([1, 2])
    # perfect separation: s(pos) = 1, s(neg) = 0 > margin away: zero loss
    assert vse_loss(img, txt, owner).item() == 0
    txt2 = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    # pos 0.6, hardest neg 0.8: hinge 0.2 + 0.8 - 0.6 = 0.4 per direction and pair
    assert vse_loss(img, txt2, owner).item() == pytest.approx(0.8)
    assert vse_loss(img, txt2, owner, max_violation=False).item() == pytest.approx(0.8)
    # two captions of the same image are not negatives of each other
    assert vse_loss(img[[0, 0]], txt2[[0, 0]], torch.tensor([1, 1])).item() == 0


def test_vse_loss_hardest_vs_sum():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    owner = torch.arange(16)
    assert vse_loss(img, txt, owner, max_violation=False) >= vse_loss(img, txt, owner)


def test_dual_encoder_unit_outputs():
    m = DualEncoder(ModelConfig(image_dim=12, text_dim=6, embed_dim=4, hidden=8))
    a, b = m(torch.randn(5, 12), torch.randn(3, 6))
    assert a.shape == (5, 4) and b.shape == (3, 4)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(5))
