"""The project's one k-means (hnal_ray.score.kmeans) and TypiClust's typicality against dense references:
exact assignment, order-free Lloyd sums, recovery of known clusters, and the typical job for any sharding."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import _unit, write_inputs
from hnal_ray.bench.select import adjusted_rand
from hnal_ray.config import ConfigError, ScoreConfig, ScoreInputs
from hnal_ray.score import worker as worker_mod
from hnal_ray.score.clusters import typical_picks, visit_plan
from hnal_ray.score.job import LocalBackend, run_score
from hnal_ray.score.kmeans import (FLAT_MAX, assign, fit_centres, in_fit, lloyd_sums, lloyd_update,
                                   split_clusters)
from hnal_ray.score.reference import dense_assign, dense_quota_select, dense_typical


def mixture(rng, n: int, k: int, d: int, spread: float):
    """Unit rows around k random unit centres; returns (x float32, true labels)."""
    centres = _unit(rng.standard_normal((k, d)))
    label = rng.integers(0, k, n)
    return _unit(centres[label] + spread * rng.standard_normal((n, d))).astype(np.float32), label


@pytest.mark.parametrize("seed", range(3))
def test_assignment_equals_float64_reference_at_near_ties_for_any_block(seed):
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((400, 24))).astype(np.float32)
    base = _unit(rng.standard_normal((30, 24)))
    # twins 1e-9..1e-6 apart and rows placed half-way between centres: float32 alone cannot rank them
    centres = np.concatenate([base, base + 10.0 ** rng.uniform(-9, -6, (30, 1)) * rng.standard_normal((30, 24))])
    x[:30] = ((base + np.roll(base, 1, axis=0)) / 2).astype(np.float32)
    want = dense_assign(x, centres)
    got, dist = assign(x, centres, with_distance=True)
    assert np.array_equal(got, want)
    assert np.allclose(dist, ((x.astype(np.float64) - centres[want]) ** 2).sum(1), rtol=0, atol=1e-12)
    for block in (1, 7, 64):
        assert np.array_equal(assign(x, centres, block=block), want)
    assert np.array_equal(np.concatenate([assign(x[i:i + 37], centres) for i in range(0, 400, 37)]), want)
    exact_twin = np.concatenate([base, base])      # exactly tied centres: the first index, as the reference
    assert np.array_equal(assign(x, exact_twin), dense_assign(x, exact_twin))
    assert assign(x, exact_twin).max() < 30


def test_lloyd_sums_are_the_same_for_any_split_and_order():
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((500, 8)))
    label = rng.integers(0, 12, 500)
    label[label == 5] = 4                              # an empty cluster keeps its centre
    whole = lloyd_sums(x, label, 12)
    perm = rng.permutation(500)
    parts = [lloyd_sums(x[perm[a:b]], label[perm[a:b]], 12) for a, b in ((0, 3), (3, 260), (260, 500))]
    assert np.array_equal(sum(p[0] for p in parts[::-1]), whole[0]) and np.array_equal(sum(p[1] for p in parts), whole[1])
    old = rng.standard_normal((12, 8))
    new = lloyd_update(old, *whole)
    for j in range(12):
        want = x[label == j].mean(0) if (label == j).any() else old[j]
        assert np.abs(new[j] - want).max() < 1e-9
    with pytest.raises(ValueError, match="L2-normalised"):
        lloyd_sums(x * 3, label, 12)


def test_adjusted_rand_on_known_answers():
    assert adjusted_rand(np.array([0, 0, 1, 1]), np.array([5, 5, 3, 3])) == 1.0
    assert abs(adjusted_rand(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])) - 4 / 7) < 1e-12
    rng = np.random.default_rng(0)
    assert abs(adjusted_rand(rng.integers(0, 5, 20_000), rng.integers(0, 5, 20_000))) < 0.01


def test_split_clusters_is_proportional_and_bounded():
    assert split_clusters(10, np.array([50, 30, 20])).tolist() == [5, 3, 2]
    assert split_clusters(4, np.array([1, 100, 0, 1])).tolist() == [1, 2, 0, 1]   # every non-empty group >= 1
    assert split_clusters(9, np.array([2, 3, 1])).tolist() == [2, 3, 1]            # at most its rows
    s = split_clusters(1000, np.random.default_rng(0).integers(1, 500, 40))
    assert s.sum() == 1000 and (s >= 1).all()


def test_fit_recovers_a_known_mixture_flat_and_two_level():
    rng = np.random.default_rng(2)
    x, truth = mixture(rng, 20_000, 60, 32, 0.05)
    centres = fit_centres(x, 60, seed=0)
    assert centres.shape == (60, 32) and np.array_equal(centres, fit_centres(x, 60, seed=0))
    assert adjusted_rand(truth, assign(x, centres)) >= 0.95
    # above FLAT_MAX clusters the fit has two levels; each point is then nearly its own cluster
    y, _ = mixture(rng, 2 * FLAT_MAX + 500, 50, 8, 0.2)
    fine = fit_centres(y, FLAT_MAX + 100, seed=1)
    assert fine.shape == (FLAT_MAX + 100, 8) and np.array_equal(fine, fit_centres(y, FLAT_MAX + 100, seed=1))
    sizes = np.bincount(assign(y, fine), minlength=len(fine))
    assert (sizes > 0).mean() > 0.9 and sizes.max() < 40


def test_fit_sample_is_a_per_row_rule_in_proportion():
    ids = np.arange(100_000, dtype=np.int64) * 7 + 3
    keep = in_fit(ids, 5, 0.1)
    assert abs(keep.mean() - 0.1) < 0.005 and np.array_equal(in_fit(ids[::-1], 5, 0.1), keep[::-1])
    assert not np.array_equal(in_fit(ids, 6, 0.1), keep) and in_fit(ids, 5, 1.0).all()


@pytest.mark.parametrize("seed", range(4))
def test_typical_picks_equal_the_pairwise_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    emb = _unit(rng.standard_normal((n, 6))).astype(np.float32)
    ids = np.sort(rng.choice(10_000, n, replace=False)).astype(np.int64)
    rows, typ = typical_picks(ids, emb, 5, neighbours=4)
    assert ids[rows].tolist() == dense_typical(ids, emb, 5, neighbours=4)
    assert len(rows) == min(5, n) and (typ > 0).all()


def test_typical_pick_is_the_densest_item_on_a_known_answer():
    # a tight group of 5 around e0 (its middle item densest), and 3 far-apart items
    emb = np.array([[1, 0, 0], [1, .1, 0], [1, -.1, 0], [1, 0, .1], [1, 0, -.1], [0, 1, 0], [0, 0, 1], [0, -1, 0]],
                   np.float32)
    ids = np.arange(8, dtype=np.int64) * 10
    rows, _ = typical_picks(ids, emb, 2, neighbours=3)
    assert rows[0] == 0 and rows[1] in (1, 2, 3, 4)


def test_visit_plan_counts_follow_typiclust_order():
    sizes, paired = np.array([10, 1, 4, 0, 6]), np.array([0, 0, 1, 0, 0])
    # each round: fewest paired first (0, 1, 4 hold none), then largest (pool + paired): 0, 4, 1; then 2
    assert visit_plan(sizes, paired, 0, 4).tolist() == [1, 1, 1, 0, 1]
    assert visit_plan(sizes, paired, 0, 9).tolist() == [3, 1, 2, 0, 3]
    assert visit_plan(sizes, paired, 5, 4).tolist() == [2, 0, 0, 0, 2]    # clusters of <= 5 items last


def typical_job(paths, out, shards, **kw):
    cfg = ScoreConfig(budget=kw.pop("budget", 9), strategy="cluster", quota="uncovered", within="typical",
                      shard_rows=-(-80 // shards) if shards else 10**6, stream_rows=5, seed=4, **kw)
    return run_score(ScoreInputs(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"])),
                     cfg, out, lambda: LocalBackend("cpu"))


@pytest.mark.parametrize("kw", [dict(clusters=8), dict(clusters=8, min_cluster_size=6, budget=14),
                                dict(max_clusters=5, typical_cap=6)])
def test_typical_job_equals_dense_for_any_shard_count(tmp_path, kw):
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(9), n_pool=80, d=12)
    outs = {s: tmp_path / f"s{s}" for s in (0, 1, 2, 3)}
    for s, out in outs.items():
        typical_job(paths, out, s, **dict(kw))
    centres = np.load(outs[0] / "centres.npy")
    pool_ids, pool = raw["pool_ids"], _unit(raw["pool_emb"]).astype(np.float32)
    cluster = dense_assign(pool, centres)
    paired_cluster = dense_assign(_unit(raw["image_emb"]).astype(np.float32), centres)
    k, budget, cap = len(centres), kw.get("budget", 9), kw.get("typical_cap", 1000)
    sizes, paired = np.bincount(cluster, minlength=k), np.bincount(paired_cluster, minlength=k)
    picks = visit_plan(sizes, paired, kw.get("min_cluster_size", 0), budget)
    from hnal_ray.score.baselines import random_keys
    ids, typ, cl, rank = [], [], [], []
    for c in np.flatnonzero(picks):  # each cluster's reference set: all of it, or the seeded sample above the cap
        members = np.flatnonzero(cluster == c)
        keep_below = min(1.0, max(cap, 4 * picks[c]) / sizes[c])
        members = members[random_keys(pool_ids[members], 4 + 1) < keep_below]
        members = members[np.argsort(pool_ids[members])]
        got = dense_typical(pool_ids[members], pool[members], int(picks[c]))
        ids += got
        cl += [c] * len(got)
        rank += list(range(len(got)))
    # TypiClust's visiting order over the picks, written out as a sort
    total = sizes + paired
    order = sorted(range(len(ids)), key=lambda i: (total[cl[i]] <= kw.get("min_cluster_size", 0), rank[i],
                                                    paired[cl[i]], -total[cl[i]], cl[i]))
    want = [ids[i] for i in order][:budget]
    if "typical_cap" in kw:
        assert (sizes > 6).any()  # the cap is reached: a sampled reference set
    for s, out in outs.items():
        assert pq.read_table(out / "selection.parquet")["image_id"].to_pylist() == want, s
        assert np.array_equal(np.load(out / "centres.npy"), centres)
    summary = json.loads((outs[2] / "summary.json").read_text())
    assert summary["config"]["within"] == "typical" and summary["counts"]["selected"] == budget


def test_typical_goes_with_uncovered():
    with pytest.raises(ConfigError, match="--within typical goes with --quota uncovered"):
        ScoreConfig(budget=3, strategy="cluster", within="typical")


def test_killed_fit_resumes_from_its_last_step(tmp_path, monkeypatch):
    """A fit that dies in its third Lloyd step resumes from the second step's checkpoint and ends with
    the centres and selection of an undisturbed run."""
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(3), n_pool=80, d=12)
    kw = dict(clusters=6, fit_iters=4)
    calls, die_at = {"n": 0}, [None]
    real = worker_mod.ScoreWorker.lloyd_part

    def dies_in_step_three(self, *args):
        calls["n"] += 1
        if calls["n"] == die_at[0]:
            raise KeyboardInterrupt("killed")
        return real(self, *args)

    monkeypatch.setattr(worker_mod.ScoreWorker, "lloyd_part", dies_in_step_three)
    typical_job(paths, tmp_path / "clean", 2, **kw)
    per_step = calls["n"] // 4                     # pool and paired shards
    assert per_step * 4 == calls["n"] and per_step >= 3
    calls["n"], die_at[0] = 0, 2 * per_step + 2    # the second shard of step 3
    with pytest.raises(KeyboardInterrupt):
        typical_job(paths, tmp_path / "cut", 2, **kw)
    steps = sorted(p.name for p in (tmp_path / "cut" / ".work" / "kmeans").glob("step-*.npy"))
    assert steps == ["step-000.npy", "step-001.npy", "step-002.npy"]
    calls["n"] = -10**9                                       # no more deaths
    typical_job(paths, tmp_path / "cut", 2, **kw)
    assert calls["n"] == -10**9 + 2 * per_step                 # steps 3 and 4 only
    assert np.array_equal(np.load(tmp_path / "cut" / "centres.npy"), np.load(tmp_path / "clean" / "centres.npy"))
    for name in ("selection.parquet", "scores.parquet"):
        assert pq.read_table(tmp_path / "cut" / name).to_pandas().equals(
            pq.read_table(tmp_path / "clean" / name).to_pandas())  # NaN == NaN here


def test_uncovered_reference_agrees_with_visit_plan():
    """The dense quota rule and visit_plan count the same picks per cluster."""
    rng = np.random.default_rng(4)
    cluster = rng.integers(0, 7, 60)
    ids = np.arange(60, dtype=np.int64)
    scores = rng.random(60)
    paired_cluster = rng.integers(0, 7, 5)
    want = dense_quota_select(ids, scores, np.full(60, np.nan, np.float32), cluster, 7, 20, "uncovered",
                              paired_cluster=paired_cluster, min_size=6)
    plan = visit_plan(np.bincount(cluster, minlength=7), np.bincount(paired_cluster, minlength=7), 6, 20)
    assert np.bincount(cluster[want], minlength=7).tolist() == plan.tolist()


def test_clusters_do_not_depend_on_precision_or_block_sizes(tmp_path):
    """The same centres and cluster ids with --precision bf16 and other block sizes (the assignment is
    exact whatever the scoring GEMM does)."""
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(5), n_pool=80, d=12)
    inputs = ScoreInputs(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"]))
    runs = {}
    for name, kw in {"fp32": {}, "bf16": dict(precision="bf16", block_pool=7, block_anchor=5)}.items():
        cfg = ScoreConfig(budget=9, strategy="cluster", quota="equal", within="hardest", clusters=6, seed=3,
                          stream_rows=5, **kw)
        run_score(inputs, cfg, tmp_path / name, lambda: LocalBackend("cpu"))
        runs[name] = pq.read_table(tmp_path / name / "scores.parquet").sort_by("image_id")
    assert runs["fp32"]["cluster"].equals(runs["bf16"]["cluster"])
    assert np.array_equal(np.load(tmp_path / "fp32" / "centres.npy"), np.load(tmp_path / "bf16" / "centres.npy"))
