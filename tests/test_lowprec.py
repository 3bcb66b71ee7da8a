"""The exact low-precision path against the dense float64 reference: continuous data, adversarial
near-threshold pairs, tiny (fp16-subnormal) components, both formats, both weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hnal_ray.score.lowprec import error_bound, score_pool_lowprec
from hnal_ray.score.reference import dense_scores
from hnal_ray.score.selection import select_top

FORMATS = [torch.float16, torch.bfloat16]


def unit(x):
    return (x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)


def near_threshold(rng, n_u=300, n_a=200, d=64, offsets=(1e-7, 1e-5, 1e-4, 3e-4, 1e-3)):
    """Anchors whose thresholds sit within `offsets` of some pool item's exact similarity, so that
    many pairs fall inside the low-precision error band on either side."""
    centres = unit(rng.standard_normal((8, d)))
    pool = unit(centres[rng.integers(0, 8, n_u)] + 0.3 * rng.standard_normal((n_u, d)))
    anchors = unit(centres[rng.integers(0, 8, n_a)] + 0.3 * rng.standard_normal((n_a, d)))
    s = pool.astype(np.float64) @ anchors.astype(np.float64).T
    partner = rng.integers(0, n_u, n_a)
    off = rng.choice(np.concatenate([offsets, -np.asarray(offsets)]), n_a)
    xi = (s[partner, np.arange(n_a)] + off).astype(np.float32)
    xi[:5] = -np.inf  # anchors with fewer than k negatives
    return pool, anchors, xi


@pytest.mark.parametrize("low", FORMATS)
@pytest.mark.parametrize("weight", ["surplus", "counting"])
def test_equals_float64_reference_near_the_threshold(low, weight):
    pool, anchors, xi = near_threshold(np.random.default_rng(3))
    want_s, want_m = dense_scores(pool, anchors, xi.astype(np.float64), weight)
    got = score_pool_lowprec(pool, anchors, xi, weight, low=low, block_pool=64, block_anchor=48)
    finite = np.isfinite(want_s)
    assert np.array_equal(np.isfinite(got.scores), finite)
    if weight == "counting":
        assert np.array_equal(got.scores, want_s)
    np.testing.assert_allclose(got.scores[finite], want_s[finite], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got.max_margin, want_m.astype(np.float32))
    assert 0 < got.band_share < 1
    # the data is adversarial: deciding by the low-precision margin alone would be wrong somewhere
    s_low = (torch.from_numpy(pool).to(low).float() @ torch.from_numpy(anchors).to(low).float().T).numpy()
    exact = pool.astype(np.float64) @ anchors.astype(np.float64).T
    assert ((s_low > xi) != (exact > xi)).any()


@pytest.mark.parametrize("low", FORMATS)
def test_selection_equals_reference_on_continuous_data(low):
    rng = np.random.default_rng(5)
    pool, anchors = unit(rng.standard_normal((500, 96))), unit(rng.standard_normal((150, 96)))
    xi = np.quantile(pool[:50].astype(np.float64) @ anchors.T.astype(np.float64), 0.97, axis=0).astype(np.float32)
    ids = np.arange(500) * 3
    for weight in ("surplus", "counting"):
        want_s, want_m = dense_scores(pool, anchors, xi.astype(np.float64), weight)
        got = score_pool_lowprec(pool, anchors, xi, weight, low=low, block_pool=128, block_anchor=64)
        a = select_top(ids, got.scores, got.max_margin, 40)
        b = select_top(ids, want_s, want_m.astype(np.float32), 40)
        assert np.array_equal(a.ids, b.ids)
        assert got.band_share < 0.2  # most pairs are decided in low precision


@pytest.mark.parametrize("low", FORMATS)
def test_the_bound_holds_for_tiny_components(low):
    """Vectors with components down in fp16's subnormal range, and large ones: |s_low - s| <= bound."""
    rng = np.random.default_rng(9)
    d = 256
    x = rng.standard_normal((400, d)) * np.where(rng.random((400, d)) < 0.5, 1e-6, 1.0)
    x[:20] = 0
    x[:20, 0] = 1.0
    x[:20, 1:40] = 1e-7  # nearly one-hot: most components underflow in fp16
    x = unit(x)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    s_low = (torch.from_numpy(x).to(low).float() @ torch.from_numpy(x).to(low).float().T).double().numpy()
    assert np.abs(s_low - s).max() <= error_bound(d, low)
    assert error_bound(d, torch.float16) < 2e-3 and error_bound(d, torch.bfloat16) < 1.7e-2


@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("weight", ["surplus", "counting"])
def test_hnal_score_with_low_precision_equals_the_dense_run(tmp_path, side, weight):
    from helpers import dense_run, write_inputs
    from hnal_ray.api import select

    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(21), n_pool=60, side=side)
    want_ids, want_scores = dense_run(raw, side, weight, 2, 9)
    for precision, shard_rows in (("fp16", 10**6), ("bf16", 14)):
        res = select(paths["paired_images"], paths["paired_texts"], paths["pool"], 9, side=side, weight=weight, k=2,
                     precision=precision, shard_rows=shard_rows, stream_rows=5)
        id_col = "image_id" if side == "image" else "text_id"
        assert res.selection[id_col].to_pylist() == list(want_ids)
        got = dict(zip(res.scores[id_col].to_pylist(), res.scores["score"].to_pylist()))
        assert got == pytest.approx({int(k): v for k, v in want_scores.items()}, abs=1e-12)
        assert res.summary["pairs_recomputed"] > 0
