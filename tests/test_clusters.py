"""The cluster-quota strategy against the dense reference: exact, and the same for any shard count."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import _unit, write_inputs
from hnal_ray.config import ConfigError, ScoreConfig, ScoreInputs
from hnal_ray.io import embedding_array
from hnal_ray.score.baselines import random_keys
from hnal_ray.score.clusters import per_cluster_top, quota_select
from hnal_ray.score.job import LocalBackend, run_score
from hnal_ray.score.kmeans import fit_centres, fit_fraction, in_fit
from hnal_ray.score.reference import dense_assign, dense_lloyd, dense_quota_select, dense_scores, dense_thresholds
from hnal_ray.score.selection import Ranked


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quota", ["equal", "proportional", "uncovered"])
def test_quota_merge_of_shard_candidates_equals_dense(seed, quota):
    rng = np.random.default_rng(seed)
    n, k, budget = 200, int(rng.integers(2, 12)), int(rng.integers(1, 40))
    ids = rng.permutation(10_000)[:n].astype(np.int64)
    scores = rng.integers(0, 4, n).astype(np.float64)                      # many ties
    margin = np.where(rng.random(n) < 0.2, np.nan, rng.integers(-3, 3, n) / 4).astype(np.float32)
    cluster = rng.integers(0, k, n)
    paired_cluster = rng.integers(0, k, int(rng.integers(1, k + 1)))      # the clusters of the labelled items
    paired = np.bincount(paired_cluster, minlength=k)
    min_size = int(rng.integers(0, 30))
    want = dense_quota_select(ids, scores, margin, cluster, k, budget, quota, paired_cluster=paired_cluster,
                              min_size=min_size)
    for shards in (1, 3, 7):
        cuts = np.linspace(0, n, shards + 1).astype(int)
        parts = [per_cluster_top(ids[a:b], scores[a:b], margin[a:b], cluster[a:b], budget)
                 for a, b in zip(cuts[:-1], cuts[1:])]
        cand = Ranked(*(np.concatenate([getattr(p, f) for p, _ in parts]) for f in ("ids", "scores", "max_margin")))
        got = quota_select(cand, np.concatenate([c for _, c in parts]), np.bincount(cluster, minlength=k), budget,
                           quota, paired=paired, min_size=min_size)
        assert got.ids.tolist() == want.tolist()


def test_uncovered_quota_takes_uncovered_clusters_first_largest_first():
    """TypiClust's order on a known answer: the best item of each cluster without a labelled item,
    largest cluster first, then the covered clusters' best items (fewest labelled first), then second
    items; with a minimum size, the small clusters after all others."""
    sizes = [5, 3, 4, 2, 4]                  # pool items of clusters 0..4; 0 and 3 hold a labelled item
    cluster = np.repeat(np.arange(5), sizes)
    ids = np.arange(len(cluster), dtype=np.int64) * 10 + 7
    scores = -np.arange(len(cluster), dtype=np.float64) % 5   # the best item of a cluster is not its first
    margin = np.full(len(cluster), np.nan, np.float32)
    paired = np.array([2, 0, 0, 1, 0])
    best = {c: ids[cluster == c][np.argmax(scores[cluster == c])] for c in range(5)}
    # uncovered: 2 and 4 (4 items each, smaller index first), then 1 (3); covered: 3 (1 labelled), then 0 (2)
    order = [best[2], best[4], best[1], best[3], best[0]]
    want = dense_quota_select(ids, scores, margin, cluster, 5, 7, "uncovered", paired_cluster=np.array([3, 0, 0]))
    assert want[:5].tolist() == order
    assert all(cluster[ids == i][0] in (2, 4) for i in want[5:])      # second items: round robin, same order
    for budget in (1, 3, 5, 7):
        got = quota_select(Ranked(ids, scores, margin), cluster, np.bincount(cluster), budget, "uncovered",
                           paired=paired)
        assert got.ids.tolist() == want[:budget].tolist()
    # clusters of at most 3 items (pool + labelled: 1 and 3) come after every other cluster's items
    small = quota_select(Ranked(ids, scores, margin), cluster, np.bincount(cluster), 15, "uncovered", paired=paired,
                         min_size=3)
    assert small.ids.tolist() == dense_quota_select(ids, scores, margin, cluster, 5, 15, "uncovered",
                                                    paired_cluster=np.array([3, 0, 0]), min_size=3).tolist()
    visited = [int(cluster[ids == i][0]) for i in small.ids]
    assert visited[:3] == [2, 4, 0] and set(visited[:13]) == {0, 2, 4} and set(visited[13:]) == {1, 3}
    equal = quota_select(Ranked(ids, scores, margin), cluster, np.bincount(cluster), 3, "equal")
    assert equal.ids.tolist() != order[:3]   # the rule is not the plain round robin
    with pytest.raises(ValueError, match="needs `paired`"):
        quota_select(Ranked(ids, scores, margin), cluster, np.bincount(cluster), 3, "uncovered")


def job(paths, out, shards, **kw):
    """`shards` in-process shards of the 80-row pool (0: one), streamed in blocks of 5 rows."""
    cfg = ScoreConfig(budget=kw.pop("budget", 9), strategy="cluster", shard_rows=-(-80 // shards) if shards else 10**6,
                      stream_rows=5, **kw)
    return run_score(ScoreInputs(str(paths["paired_images"]), str(paths["paired_texts"]), str(paths["pool"])),
                     cfg, out, lambda: LocalBackend("cpu"))


@pytest.mark.parametrize("within,quota,side,clusters", [
    ("hardest", "equal", "image", 6), ("random", "equal", "image", 6), ("hardest", "proportional", "text", 6),
    ("central", "equal", "image", 6), ("hardest", "hardness", "image", 6), ("random", "hardness", "text", 6),
    ("central", "uncovered", "image", 0), ("central", "uncovered", "text", 0), ("hardest", "uncovered", "image", 40),
    ("central", "uncovered", "image", -1)])   # -1: default k, fitted on a sample (one item per centroid)
def test_cluster_job_equals_dense_for_any_shard_count(tmp_path, within, quota, side, clusters):
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(7), n_pool=80, side=side)
    cluster_sample, mppc = (50, 32) if clusters >= 0 else (20, 1)
    clusters = max(clusters, 0)
    kw = dict(within=within, quota=quota, clusters=clusters, cluster_sample=cluster_sample, seed=4, side=side,
              max_points_per_centroid=mppc)
    summaries = {s: job(paths, tmp_path / f"s{s}", s, **kw) for s in (0, 1, 2, 3)}
    id_col = "image_id" if side == "image" else "text_id"
    # the reference: the same seeded samples, the FAISS start, plain float64 Lloyd steps, then dense
    # scores, assignment and quotas
    pool_ids, pool = raw["pool_ids"], _unit(raw["pool_emb"])
    paired_ids = paired = paired_cluster = None
    if quota == "uncovered":  # TypiClust: the side's paired items join the fit; k = n_p + budget
        paired_ids, paired_emb = (raw["image_ids"], raw["image_emb"]) if side == "image" else \
            (raw["text_ids"], raw["text_emb"])
        paired = _unit(paired_emb).astype(np.float32)
    n_items = len(pool_ids) + (0 if paired is None else len(paired))
    k = min(clusters or (0 if paired is None else len(paired)) + 9, n_items)
    fraction = fit_fraction(n_items, k, mppc)
    assert (fraction < 1) == (mppc == 1)

    def sample(f):
        rows = [(pool_ids, pool.astype(np.float32))] + ([] if paired is None else [(paired_ids, paired)])
        return np.concatenate([e[in_fit(i, 4, f)][np.argsort(i[in_fit(i, 4, f)])] for i, e in rows])

    centres = dense_lloyd(sample(fraction), fit_centres(sample(min(fraction, max(cluster_sample, 2 * k) / n_items)), k, 4), 2)
    for s in summaries:
        got_centres = np.load(tmp_path / f"s{s}" / "centres.npy")
        assert got_centres.shape == centres.shape and np.abs(got_centres - centres).max() < 1e-8, s
    centres = np.load(tmp_path / "s0" / "centres.npy")
    cluster = dense_assign(pool.astype(np.float32), centres)
    if quota == "uncovered":
        paired_cluster = dense_assign(paired, centres)
        assert len(centres) == k and 0 < len(set(paired_cluster.tolist())) < k  # covered and uncovered clusters
    img, txt = _unit(raw["image_emb"]), _unit(raw["text_emb"])
    th = dense_thresholds(txt, raw["owner"], img, raw["image_ids"], 1, side)
    hardness, _ = dense_scores(pool, txt if side == "image" else img, th, "surplus")
    if within == "random":
        scores, margin = random_keys(pool_ids, 4), np.full(len(pool_ids), np.nan)
    elif within == "central":
        scores = -((pool.astype(np.float32).astype(np.float64) - centres[cluster]) ** 2).sum(1)
        margin = np.full(len(pool_ids), np.nan)
    else:
        scores, margin = dense_scores(pool, txt if side == "image" else img, th, "surplus")
    want = dense_quota_select(pool_ids, scores, margin, cluster, len(centres), 9, quota, hardness, paired_cluster)
    if quota == "uncovered":  # the labelled items change the answer
        assert want.tolist() != dense_quota_select(pool_ids, scores, margin, cluster, len(centres), 9, "equal").tolist()
    if quota == "hardness":  # the data has clusters of different hardness, so the quota matters
        assert len(set(np.bincount(cluster[hardness > 0], minlength=6).tolist())) > 1
    for s in summaries:
        sel = pq.read_table(tmp_path / f"s{s}" / "selection.parquet")
        assert sel[id_col].to_pylist() == want.tolist(), s
        got = pq.read_table(tmp_path / f"s{s}" / "scores.parquet").sort_by(id_col)
        order = np.argsort(pool_ids)
        assert got["cluster"].to_pylist() == cluster[order].tolist()
        if s:
            assert pq.read_table(tmp_path / f"s{s}" / "scores.parquet").sort_by(id_col).to_pandas().equals(
                pq.read_table(tmp_path / "s0" / "scores.parquet").sort_by(id_col).to_pandas())  # NaN == NaN
    assert len({json.dumps(sorted(np.asarray(sel).tolist())) for sel in
                (pq.read_table(tmp_path / f"s{s}" / "selection.parquet")[id_col] for s in summaries)}) == 1


def test_reducible_selection_is_the_top_of_the_difference():
    from hnal_ray.score.selection import select_reducible

    ids = np.arange(10) * 3
    cur = np.array([5, 4, 3, 2, 1, 0, np.inf, 7, 7, 0.5])
    ref = np.array([5, 0, 3, 0, 1, 0, np.inf, 1, 6, 0.0])
    margin = np.linspace(0.1, 0.2, 10).astype(np.float32)
    got = select_reducible(ids, cur, ids, ref, margin, 4)
    # differences 0 4 0 2 0 0 0(inf-inf) 6 1 0.5: 7 -> 21, 1 -> 3, 3 -> 9, 8 -> 24
    assert got.ids.tolist() == [21, 3, 9, 24] and got.scores.tolist() == [6, 4, 2, 1]
    with pytest.raises(ValueError, match="same items"):
        select_reducible(ids, cur, ids[::-1], ref, margin, 4)


def _groups_inputs(root: Path) -> tuple[dict, dict]:
    """Pool items in four tight groups around e0..e3 (6, 4, 3 and 2 items) and two paired images in
    the first group: known clusters, only the largest one covered. Returns (paths, {group: centre-most id})."""
    sizes, spread = [6, 4, 3, 2], [4, 5, 6, 7, 8, 9]
    emb, ids, central = [], [], {}
    for g, n in enumerate(sizes):
        for j in range(n):
            v = np.zeros(16, np.float32)
            v[g] = 1.0
            if j:  # the first item of a group is its centre direction; the others lean off it symmetrically
                v[spread[(j - 1) // 2]] = 0.25 if j % 2 else -0.25
            emb.append(v)
            ids.append(1000 + 10 * g + j)
        central[g] = 1000 + 10 * g
    image_emb = np.zeros((2, 16), np.float32)
    image_emb[:, 0] = 1.0
    image_emb[1, 10] = 0.25
    root.mkdir(parents=True)
    paths = {"paired_images": root / "pi.parquet", "paired_texts": root / "pt.parquet", "pool": root / "pool.parquet"}
    pq.write_table(pa.table({"image_id": np.array([1, 2]), "embedding": embedding_array(image_emb)}),
                   paths["paired_images"])
    pq.write_table(pa.table({"text_id": np.array([5, 6]), "image_id": np.array([1, 2]),
                             "embedding": embedding_array(image_emb)}), paths["paired_texts"])
    perm = np.random.default_rng(0).permutation(len(ids))
    pq.write_table(pa.table({"image_id": np.array(ids)[perm], "embedding": embedding_array(np.array(emb)[perm])}),
                   paths["pool"], row_group_size=4)
    return paths, central


@pytest.mark.parametrize("shards", [0, 2, 5])
def test_uncovered_job_picks_uncovered_groups_largest_first(tmp_path, shards):
    paths, central = _groups_inputs(tmp_path / "in")
    run = dict(within="central", seed=1, shard_rows=3 if shards else 10**6, stream_rows=2)
    inputs = ScoreInputs(*(str(paths[r]) for r in ("paired_images", "paired_texts", "pool")))
    # k = 2 paired + 2 budget = 4 clusters, one per group; group 0 holds the labelled images
    got = run_score(inputs, ScoreConfig(budget=2, strategy="cluster", quota="uncovered", **run), tmp_path / "a",
                    lambda: LocalBackend("cpu"))
    assert got["config"]["quota"] == "uncovered"
    assert pq.read_table(tmp_path / "a" / "selection.parquet")["image_id"].to_pylist() == [central[1], central[2]]
    scores = pq.read_table(tmp_path / "a" / "scores.parquet")
    label = dict(zip(scores["image_id"].to_pylist(), scores["cluster"].to_pylist()))
    assert sorted(sorted({label[i] for i in label if i // 10 % 100 == g}) for g in range(4)) == [[0], [1], [2], [3]]
    run_score(inputs, ScoreConfig(budget=4, clusters=4, strategy="cluster", quota="uncovered", **run), tmp_path / "b",
              lambda: LocalBackend("cpu"))
    assert pq.read_table(tmp_path / "b" / "selection.parquet")["image_id"].to_pylist() == [
        central[1], central[2], central[3], central[0]]  # then the covered group


def test_bad_quota_is_one_config_error_and_uncovered_passes_everywhere():
    from hnal_ray.cli import build_parser
    from hnal_ray.loop.config import load_loop_config

    with pytest.raises(ConfigError, match=r"--quota must be one of .*'uncovered'.*got 'typiclust'"):
        ScoreConfig(budget=3, strategy="cluster", quota="typiclust")
    smoke = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
    with pytest.raises(ConfigError, match=r"smoke.yaml: --quota must be one of"):
        load_loop_config(smoke, ["strategies=[{name: t, strategy: cluster, quota: typiclust}]"])
    cfg = load_loop_config(smoke, ["strategies=[{name: typiclust, strategy: cluster, within: central, "
                                   "quota: uncovered}]"])
    assert cfg.strategies[0].score_config(20, 0, 0).quota == "uncovered"
    a = build_parser().parse_args(["score", "--paired-images", "a", "--paired-texts", "b", "--pool", "c",
                                   "--budget", "2", "--strategy", "cluster", "--quota", "uncovered", "--out", "o"])
    assert a.quota == "uncovered"
