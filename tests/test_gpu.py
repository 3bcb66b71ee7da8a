"""The same kernels on a CUDA device (skipped without one): GPU results equal the CPU's."""
import numpy as np
import pytest
import torch

from helpers import paired_set, quantized
from hnal_ray.score.scoring import score_pool
from hnal_ray.score.thresholds import kth, negative_topk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("weight", ["surplus", "counting"])
def test_gpu_scores_equal_cpu(weight):
    rng = np.random.default_rng(0)
    image_ids, image_emb, owner, text_emb = paired_set(rng, 300, 3, 16)
    pool = quantized(rng, 5000, 16)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    th_cpu = kth(negative_topk(text_emb, owner, image_emb, image_ids, 2, cpu), 2)
    th_gpu = kth(negative_topk(text_emb, owner, image_emb, image_ids, 2, gpu), 2)
    np.testing.assert_array_equal(th_cpu, th_gpu)
    a, b = score_pool(pool, text_emb, th_cpu, weight, cpu), score_pool(pool, text_emb, th_cpu, weight, gpu)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.max_margin, b.max_margin)
