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


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight", ["surplus", "counting"])
def test_exact_low_precision_on_tensor_cores_equals_the_float64_reference(low, weight):
    """The real tensor-core product (fp16/bf16 inputs, fp32 accumulation) inside the error bound:
    the exact path's outputs equal the float64 reference on adversarial near-threshold data."""
    from test_lowprec import near_threshold

    from hnal_ray.score.lowprec import score_pool_lowprec
    from hnal_ray.score.reference import dense_scores

    pool, anchors, xi = near_threshold(np.random.default_rng(3), n_u=3000, n_a=2000, d=256)
    want_s, want_m = dense_scores(pool, anchors, xi.astype(np.float64), weight)
    got = score_pool_lowprec(pool, anchors, xi, weight, torch.device("cuda"), low=low)
    finite = np.isfinite(want_s)
    np.testing.assert_allclose(got.scores[finite], want_s[finite], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got.max_margin, want_m.astype(np.float32))
    assert got.band_share < 0.5
