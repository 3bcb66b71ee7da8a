"""The `hnal score` job: check inputs, thresholds, score shards, merge one top-B, write outputs.

Backends run the shard workers: in-process (`LocalBackend`, shards=0) or as Ray actors
(`hnal_ray.cluster.RayBackend`). The driver is the only writer of the manifest and the final
files; every file is written to a temporary name and renamed, so an interrupted run resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from hnal_ray.score.baselines import coreset_select
from hnal_ray.score.clusters import quota_select, visit_plan
from hnal_ray.score.kmeans import fit_centres, fit_fraction, in_fit, lloyd_update
from hnal_ray.score.coverage import SLACK, Candidates, greedy_cover
from hnal_ray.config import HERDING, ScoreConfig, ScoreInputs, key_fields
from hnal_ray.score import herding, pruning
from hnal_ray.score.kmeans import cluster_labels
from hnal_ray.device import faiss_uses_gpu, pick_device
from hnal_ray.io import InputError, read_embeddings, read_json, read_ids, read_rows, write_json, write_parquet
from hnal_ray.score.outdir import check_out, out_lock
from hnal_ray.score.plan import Plan, check_inputs, input_fingerprint, key_shards, load_keys_sorted, pool_shards
from hnal_ray.score.selection import Ranked, merge_top
from hnal_ray.score.thresholds import kth, merge_topk, minibatch_thresholds
from hnal_ray.score.worker import Anchors, ScoreTask, ScoreWorker, ShardResult, ShardSpec, score_table

log = logging.getLogger(__name__)
ANCHOR_CLUSTERS = 256  # --method pruned: k-means clusters of the anchors
GREEDY = ("coverage", *HERDING)  # picks proved on the driver from each shard's candidates


class Backend(Protocol):
    def threshold_parts(self, shards: list[ShardSpec], anchors: Anchors, k: int,
                        stream_rows: int) -> list[np.ndarray]: ...
    def score(self, shards: list[ShardSpec], tasks: list[ScoreTask], anchors: Anchors | None,
              thresholds: np.ndarray | None, part_paths: list[str]) -> Iterator[ShardResult]:
        """Score the given pool shards (task and output path per shard); yield results as they finish."""
    def run(self, method: str, calls: list[tuple]) -> Iterator:
        """ScoreWorker.`method`(*args) for each args tuple, on whichever worker is free; results as they finish."""
    def info(self) -> dict: ...
    def close(self) -> None: ...


class LocalBackend:
    """The sequential backend: one worker, in this process, takes the shards in order."""

    def __init__(self, device: str):
        self.worker = ScoreWorker(device)

    def threshold_parts(self, shards, anchors, k, stream_rows):
        return [self.worker.threshold_part(s, anchors, k, stream_rows) for s in shards]

    def score(self, shards, tasks, anchors, thresholds, part_paths):
        for spec, task, path in zip(shards, tasks, part_paths):
            yield self.worker.score(spec, task, anchors, thresholds, path)

    def run(self, method, calls):
        for args in calls:
            yield getattr(self.worker, method)(*args)

    def info(self):
        return {"backend": "local", "workers": [self.worker.info()]}

    def close(self):
        pass


def run_key(inputs: ScoreInputs, cfg: ScoreConfig) -> str:
    """Content fingerprint of the inputs and of the options that decide the outputs
    (`config.key_fields`): a finished run is reused whatever the shards or actors."""
    blob = json.dumps({"inputs": input_fingerprint(inputs), "config": key_fields(cfg), "version": 4},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def work_key(key: str, cfg: ScoreConfig) -> str:
    """An unfinished run's parts are numbered by shard: they are resumed only with the same cut."""
    return f"{key}-rows{cfg.shard_rows}"


def finished_summary(inputs: ScoreInputs, cfg: ScoreConfig, out_dir: str | os.PathLike) -> dict | None:
    """The summary of a finished run of these inputs and config in `out_dir`, or None (cheap: no Ray)."""
    check_out(Path(out_dir), inputs)
    return _finished_summary(Path(out_dir), run_key(inputs, cfg))


def run_score(inputs: ScoreInputs, cfg: ScoreConfig, out_dir: str | os.PathLike,
              make_backend=None) -> dict:
    """Run (or resume, or skip if finished) one scoring job, as the only writer of `out_dir`;
    returns the summary dict."""
    out = Path(out_dir)
    check_out(out, inputs)
    with out_lock(out, cfg.wait):
        return _run_locked(inputs, cfg, out, make_backend)


def _run_locked(inputs: ScoreInputs, cfg: ScoreConfig, out: Path, make_backend) -> dict:
    t0, timings = time.perf_counter(), {}
    key = run_key(inputs, cfg)
    done = _finished_summary(out, key)
    if done is not None:
        return done
    plan = check_inputs(inputs, cfg)
    timings["check_inputs_s"] = time.perf_counter() - t0
    device = pick_device(cfg.device)  # the driver's (workers choose theirs in their own process)
    if cfg.strategy == "coreset":
        return _run_coreset(inputs, cfg, plan, out, key, t0, timings, device)
    specs = pool_shards(plan, cfg.shard_rows)
    n_shards = len(specs)
    t = time.perf_counter()
    backend = (make_backend or (lambda: LocalBackend(cfg.device)))()
    try:
        timings["start_s"] = time.perf_counter() - t
        work = _work_dir(out, work_key(key, cfg))
        manifest = json.loads((work / "manifest.json").read_text())
        nonce = secrets.token_hex(6)  # this driver's workers write under names only it renames
        thresholds = _thresholds(plan, cfg, backend, work, timings)
        centres = _centres(plan, cfg, backend, work, timings, device) if cfg.strategy == "cluster" else None
        herd = _herding(plan, cfg, timings, device) if cfg.strategy in HERDING else None
        anchor_clusters = _anchor_clusters(plan, cfg, timings) if cfg.method == "pruned" and thresholds is not None \
            else None
        m = manifest.get("candidates") or cfg.candidates or 4 * cfg.budget  # greedy: candidates per shard
        t = time.perf_counter()
        while True:
            task = ScoreTask(cfg.strategy, cfg.weight, cfg.budget, cfg.seed, cfg.block_pool, cfg.block_anchor,
                             centres=centres, within=cfg.within, quota=cfg.quota, stream_rows=cfg.stream_rows,
                             precision=cfg.precision, candidates=m, anchor_clusters=anchor_clusters,
                             **(herd.task_fields() if herd else {}))
            todo = [s for s in specs if not _shard_done(work, manifest, s.index)]
            results = backend.score(todo, [task] * len(todo), plan.anchors if thresholds is not None else None, thresholds,
                                    [str(_fenced(work / "parts", s.index, nonce)) for s in todo])
            for res in tqdm(results, total=len(todo), desc="score shards", unit="shard", disable=None):
                _record(work, manifest, res, nonce)
            if cfg.strategy not in GREEDY:
                break
            parts = [_read_candidates(work, manifest, i) for i in range(n_shards)]
            selection = (herding.greedy_herd(parts, cfg.budget, herd.covered) if herd else
                         greedy_cover(parts, cfg.budget, len(plan.anchors.ids), SLACK if cfg.weight == "surplus" else 0.0))
            if selection is not None:
                break
            log.info("%s: %d candidates per shard cannot prove every pick; asking for %d", cfg.strategy, m, 4 * m)
            m *= 4
            manifest["pairs_before"] = manifest.get("pairs_before", 0) + sum(v["pairs"] for v in manifest["shards"].values())
            manifest["shards"], manifest["candidates"] = {}, m  # every shard again, with more candidates
            write_json(manifest, work / "manifest.json")
        timings["score_s"] = time.perf_counter() - t
        paired = None
        if cfg.strategy not in GREEDY:
            selection = None
        if cfg.strategy == "cluster" and cfg.quota == "uncovered":
            t = time.perf_counter()
            paired = _paired_counts(plan, cfg, backend, centres)
            timings["covered_s"] = time.perf_counter() - t
            log.info("uncovered: %d of %d clusters hold no paired item", int((paired == 0).sum()), len(paired))
            if cfg.within == "typical":
                t = time.perf_counter()
                sizes = np.sum([manifest["shards"][str(i)]["cluster_counts"] for i in range(n_shards)], axis=0)
                selection = _typical_select(plan, cfg, backend, work, sizes, paired, n_shards, nonce)
                timings["typical_s"] = time.perf_counter() - t
        backend_info = backend.info()
    finally:
        backend.close()
    if cfg.strategy in GREEDY or selection is not None:
        if cfg.strategy in GREEDY:
            timings["candidates_per_shard"] = m
        return _finish(out, work, selection, plan, cfg, inputs, key, t0, timings, manifest, backend_info,
                       herd.summary() if herd else None)
    tops = [_read_top(work, i)[:2] for i in range(n_shards)]
    if cfg.strategy == "cluster":
        shard_info = [manifest["shards"][str(i)] for i in range(n_shards)]
        sizes = np.sum([m["cluster_counts"] for m in shard_info], axis=0)
        hard = np.sum([m["cluster_hard"] for m in shard_info], axis=0) if cfg.quota == "hardness" else None
        cand = Ranked(*(np.concatenate([getattr(t, f) for t, _ in tops]) for f in ("ids", "scores", "max_margin")))
        selection = quota_select(cand, np.concatenate([c for _, c in tops]), sizes, cfg.budget, cfg.quota, hard,
                                 paired, cfg.min_cluster_size)
    else:
        selection = merge_top([t for t, _ in tops], cfg.budget)
    return _finish(out, work, selection, plan, cfg, inputs, key, t0, timings, manifest, backend_info)


@dataclasses.dataclass(frozen=True)
class Herding:
    """probcover/maxherding: the support rows, their coverage by the paired items and the kernel."""

    support: np.ndarray   # (|U|, d) float64
    covered: np.ndarray   # (|U|,) float64
    kernel: herding.Kernel
    fraction: float

    def task_fields(self) -> dict:
        return {"support": self.support, "covered": self.covered, "kernel": self.kernel}

    def summary(self) -> dict:
        return {"support": len(self.support), "support_fraction": self.fraction, "kernel": self.kernel.kind,
                "scale": self.kernel.scale, "mean_coverage_of_paired": float(self.covered.mean()) if len(self.covered) else 0.0}


def _anchor_clusters(plan: Plan, cfg: ScoreConfig, timings: dict) -> pruning.AnchorClusters:
    """--method pruned: a seeded k-means of the anchors, fitted once here and sent with every shard (any
    clustering gives the same numbers; a good one skips more)."""
    t = time.perf_counter()
    clusters = pruning.cluster_anchors(plan.anchors.emb, ANCHOR_CLUSTERS, cfg.seed)
    timings["anchor_kmeans_s"] = time.perf_counter() - t
    return clusters


def _herding(plan: Plan, cfg: ScoreConfig, timings: dict, device: torch.device) -> Herding:
    """The support (a seeded per-row sample of pool and paired items, at most about --support), the
    kernel's scale (probcover: the purity radius of a k-means of the support; maxherding: --bandwidth
    or the kNN rule) and each support item's coverage by the paired items; on the driver."""
    t = time.perf_counter()
    fraction = min(1.0, cfg.support / max(plan.n_pool + plan.n_keys, 1))
    support = np.concatenate([_fit_rows(plan.tables.pool_path, plan.tables.pool_id, cfg.seed, fraction, plan.dim),
                              _fit_rows(plan.tables.key_path, plan.tables.key_id, cfg.seed, fraction, plan.dim)])
    timings["herding_support_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if cfg.strategy == "probcover":
        k = cfg.clusters or plan.n_keys + cfg.budget
        k = max(1, min(k, cfg.max_clusters or k, len(support)))
        labels = cluster_labels(support, k, cfg.seed)[1]
        kernel = herding.Kernel("ball", herding.purity_radius(support, labels, cfg.purity, device))
    else:
        kernel = herding.Kernel("gauss", cfg.bandwidth or herding.knn_bandwidth(support, device))
    timings["herding_scale_s"] = time.perf_counter() - t
    t = time.perf_counter()
    support = support.astype(np.float64)
    covered = herding.coverage_of(support, load_keys_sorted(plan)[2], kernel)
    timings["herding_covered_s"] = time.perf_counter() - t
    log.info("%s: %d support items, %s kernel scale %.4g, mean coverage by the paired items %.3f", cfg.strategy,
             len(support), kernel.kind, kernel.scale, covered.mean() if len(covered) else 0.0)
    return Herding(support, covered, kernel, fraction)


def _n_clusters(plan: Plan, cfg: ScoreConfig) -> int:
    """k: --clusters, else one per budget item (quota uncovered: plus one per paired item of the side,
    as TypiClust), at most --max-clusters and the items fitted."""
    paired = plan.n_keys if cfg.quota == "uncovered" else 0
    k = cfg.clusters or paired + cfg.budget
    if cfg.max_clusters:
        k = min(k, cfg.max_clusters)
    return max(1, min(k, plan.n_pool + paired))


def _centres(plan: Plan, cfg: ScoreConfig, backend, work: Path, timings: dict, device: torch.device) -> np.ndarray:
    """The k-means centres (hnal_ray.score.kmeans), checkpointed in the work dir after every step so
    a killed fit resumes from its last one.

    The fit sample is every item (pool, and with quota uncovered the side's paired items: TypiClust
    clusters labelled and unlabelled items together) whose seeded hash falls below one fraction, at
    most --max-points-per-centroid x k items in all, each side in proportion to its count. A share of
    it, at most --cluster-sample items (or 2k), is read into the driver for a seeded FAISS start (two levels
    above a few thousand clusters); then --fit-iters exact Lloyd steps run over the whole sample on
    the workers, which stream their shards and return integer sums and counts per cluster."""
    kdir = work / "kmeans"
    done = sorted(kdir.glob("step-*.npy")) if kdir.exists() else []
    final = kdir / f"step-{cfg.fit_iters:03d}.npy"
    if final.exists():
        return np.load(final)
    t = time.perf_counter()
    with_paired = cfg.quota == "uncovered"
    n_items = plan.n_pool + (plan.n_keys if with_paired else 0)
    k = _n_clusters(plan, cfg)
    fraction = fit_fraction(n_items, k, cfg.max_points_per_centroid)
    tables = [(plan.tables.pool_path, plan.tables.pool_id)] + (
        [(plan.tables.key_path, plan.tables.key_id)] if with_paired else [])
    if done:
        step, centres = int(done[-1].stem.split("-")[1]), np.load(done[-1])
        log.info("k-means: resuming after step %d of %d", step, cfg.fit_iters)
    else:
        start = min(fraction, max(cfg.cluster_sample, 2 * k) / n_items)  # and enough for k centres
        parts = [_fit_rows(path, col, cfg.seed, start, plan.dim) for path, col in tables]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        del parts
        timings["kmeans_sample_s"] = time.perf_counter() - t
        centres = fit_centres(x, k, cfg.seed, gpu=faiss_uses_gpu(device))
        step = 0
        _save(kdir / "step-000.npy", centres)
        timings["kmeans_start_s"] = time.perf_counter() - t - timings["kmeans_sample_s"]
        log.info("k-means start: %d centres from %d sampled items (FAISS) in %.2fs", len(centres), len(x),
                 timings["kmeans_start_s"])
    specs = pool_shards(plan, cfg.shard_rows) + (key_shards(plan, cfg.shard_rows) if with_paired else [])
    for step in range(step + 1, cfg.fit_iters + 1):
        ts = time.perf_counter()
        sums, counts = np.zeros((len(centres), plan.dim), np.int64), np.zeros(len(centres), np.int64)
        for s, c in backend.run("lloyd_part", [(spec, centres, fraction, cfg.seed, cfg.stream_rows)
                                               for spec in specs]):
            sums += s  # integers: the same totals in any order
            counts += c
        centres = lloyd_update(centres, sums, counts)
        _save(kdir / f"step-{step:03d}.npy", centres)
        timings[f"lloyd_step_{step}_s"] = time.perf_counter() - ts
        log.info("k-means step %d/%d over %d items: %d empty clusters, %.2fs", step, cfg.fit_iters,
                 int(counts.sum()), int((counts == 0).sum()), timings[f"lloyd_step_{step}_s"])
    timings["kmeans_s"] = time.perf_counter() - t
    return centres


def _fit_rows(path: str, id_column: str, seed: int, fraction: float, dim: int) -> np.ndarray:
    """The rows of a table in the fit sample at `fraction`, in id order (the driver reads only them)."""
    ids = np.concatenate([part for _, part in read_ids(path, id_column)])
    rows = np.flatnonzero(in_fit(ids, seed, fraction))
    sample = read_rows(path, id_column, rows, dim)
    return sample.emb[np.argsort(sample.ids, kind="stable")]


def _discard(path: Path) -> None:
    """Remove an earlier run's output file or folder, if there is one."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.stem + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _paired_counts(plan: Plan, cfg: ScoreConfig, backend, centres: np.ndarray) -> np.ndarray:
    """(k,) paired items of the side nearest each centre, assigned on the workers like the pool."""
    counts = np.zeros(len(centres), np.int64)
    for c in backend.run("count_part", [(s, centres, cfg.stream_rows) for s in key_shards(plan, cfg.shard_rows)]):
        counts += c
    return counts


def _typical_select(plan: Plan, cfg: ScoreConfig, backend, work: Path, sizes: np.ndarray, paired: np.ndarray,
                    n_shards: int, nonce: str) -> Ranked:
    """TypiClust's picks (--within typical): how many each cluster gives follows from the counts
    alone (visit_plan); then each worker writes its shard's rows of those clusters (a seeded sample
    of about --typical-cap items of a larger cluster), and the typicality of each cluster is computed
    from all of its rows at once, a chunk of clusters per call, on the workers."""
    picks = visit_plan(sizes, paired, cfg.min_cluster_size, cfg.budget)
    keep_below = np.where(sizes > 0, np.minimum(1.0, np.maximum(cfg.typical_cap, 4 * picks) / np.maximum(sizes, 1)),
                          0.0)
    keep_below[picks == 0] = 0.0
    tdir = work / "typical"
    specs = pool_shards(plan, cfg.shard_rows)
    todo = [s for s in specs if not (tdir / f"part-{s.index:05d}.parquet").exists()]
    rows = list(backend.run("typical_part", [(s, str(work / "parts" / f"part-{s.index:05d}.parquet"), keep_below,
                                              cfg.seed, str(_fenced(tdir, s.index, nonce)), cfg.stream_rows)
                                             for s in todo]))
    for s in todo:
        os.replace(_fenced(tdir, s.index, nonce), tdir / f"part-{s.index:05d}.parquet")
    log.info("typicality: %d rows of %d clusters written by %d shards", sum(rows), int((picks > 0).sum()), len(todo))
    chosen = np.flatnonzero(picks)
    expect = np.minimum(sizes, np.maximum(cfg.typical_cap, 4 * picks))[chosen]
    chunks, lo, acc = [], 0, 0
    for i, n in enumerate(expect):  # ~100k rows of reference sets a call
        acc += int(n)
        if acc >= 100_000 or i == len(chosen) - 1:
            chunks.append(chosen[lo:i + 1])
            lo, acc = i + 1, 0
    paths = [str(tdir / f"part-{i:05d}.parquet") for i in range(n_shards)]
    got = list(backend.run("typical_chunk", [(paths, c, picks[c], plan.dim) for c in chunks]))
    ids, typ, cluster, rank = (np.concatenate([g[j] for g in got]) if got else np.zeros(0) for j in range(4))
    if len(ids) < cfg.budget:
        raise RuntimeError(f"typicality: {len(ids)} picks for a budget of {cfg.budget}; a cluster's sample was "
                           f"smaller than its share of picks: raise --typical-cap")
    nan = np.full(len(ids), np.nan, np.float32)
    return quota_select(Ranked(ids.astype(np.int64), typ.astype(np.float64), nan), cluster.astype(np.int64), sizes,
                        cfg.budget, "uncovered", paired=paired, min_size=cfg.min_cluster_size,
                        rank=rank.astype(np.int64))


def _thresholds(plan: Plan, cfg: ScoreConfig, backend, work: Path, timings: dict) -> np.ndarray | None:
    """Per-anchor thresholds, cached in the work dir so a resumed run does not redo them."""
    if not cfg.uses_thresholds:
        return None
    cache = work / "thresholds.npy"
    if cache.exists():
        return np.load(cache)
    t = time.perf_counter()
    if cfg.threshold_batch is None:
        parts = backend.threshold_parts(key_shards(plan, cfg.shard_rows), plan.anchors, cfg.k, cfg.stream_rows)
        thresholds = kth(merge_topk(parts, cfg.k), cfg.k)
    else:
        key_ids, key_group, key_emb = load_keys_sorted(plan)
        a = plan.anchors
        if cfg.side == "image":
            thresholds = minibatch_thresholds(a.emb, a.group, key_emb, key_ids, cfg.k, cfg.threshold_batch,
                                              cfg.seed, "image")
        else:
            thresholds = minibatch_thresholds(key_emb, key_group, a.emb, a.ids, cfg.k, cfg.threshold_batch,
                                              cfg.seed, "text")
    _check_thresholds(thresholds, cfg)
    _save(cache, thresholds)
    timings["thresholds_s"] = time.perf_counter() - t
    log.info("thresholds for %d anchors in %.2fs", len(thresholds), timings["thresholds_s"])
    return thresholds


def _check_thresholds(thresholds: np.ndarray, cfg: ScoreConfig) -> None:
    """Refuse a selection that the thresholds make meaningless: a paired item with fewer than k
    negatives has threshold -inf (SPEC), so under Surplus every pool item scores +inf and the top B
    are just the smallest ids; under Counting only all of them at -inf leave nothing to rank."""
    short = int(np.isneginf(thresholds).sum())
    if short and (cfg.weight == "surplus" or short == len(thresholds)):
        where = "in its mini-batch of " + str(cfg.threshold_batch) if cfg.threshold_batch else "among the paired set"
        raise InputError(f"--k {cfg.k}: {short} of {len(thresholds)} paired {'texts' if cfg.side == 'image' else 'images'} "
                         f"have fewer than {cfg.k} negatives {where}, so their threshold is -inf and "
                         f"{'every pool item would score +inf' if cfg.weight == 'surplus' else 'every pool item ties'}: "
                         f"the selection would be meaningless. Use a smaller --k"
                         f"{' or a larger --threshold-batch' if cfg.threshold_batch else ' or a larger paired set'}")


def _run_coreset(inputs, cfg, plan, out, key, t0, timings, device: torch.device) -> dict:
    """Greedy k-center is sequential over picks: it runs on the driver, over the whole pool."""
    t = time.perf_counter()
    pool = read_embeddings(plan.tables.pool_path, plan.tables.pool_id, dim=plan.dim)
    order = np.argsort(pool.ids, kind="stable")
    ids, emb = pool.ids[order], pool.emb[order]
    _, _, centers = load_keys_sorted(plan)
    picked, at_pick, final = coreset_select(emb, centers, cfg.budget, device)
    final[picked] = at_pick
    nan = np.full(len(ids), np.nan, np.float32)
    work = _work_dir(out, work_key(key, cfg))
    write_parquet(score_table(plan.tables.pool_id, ids, final, nan), work / "parts" / "part-00000.parquet")
    selection = Ranked(ids[picked], at_pick, nan[: len(picked)])
    timings["score_s"] = time.perf_counter() - t
    manifest = {"shards": {"0": {"rows": len(ids), "pairs": 0, "seconds": timings["score_s"], "node": "driver"}}}
    return _finish(out, work, selection, plan, cfg, inputs, key, t0, timings, manifest, {"backend": "driver"})


def _work_dir(out: Path, key: str) -> Path:
    """out/.work holds parts and the manifest of an unfinished run; another run's is discarded."""
    work = out / ".work"
    manifest = read_json(work / "manifest.json")
    if manifest is not None and manifest.get("run_key") == key:
        return work
    shutil.rmtree(work, ignore_errors=True)
    (work / "parts").mkdir(parents=True)
    (work / "top").mkdir()
    write_json({"run_key": key, "shards": {}}, work / "manifest.json")
    return work


def _fenced(folder: Path, i: int, nonce: str) -> Path:
    """Where a worker writes shard i's part for the driver holding `nonce`: a hidden name that only
    that driver renames to `part-NNNNN.parquet` once it has the result. A worker left over from a
    killed driver (Ray ends it about a second later) can only write a name nobody reads."""
    return folder / f".part-{i:05d}-{nonce}.parquet"


def _record(work: Path, manifest: dict, res: ShardResult, nonce: str | None = None) -> None:
    cols = {"id": res.top.ids, "score": res.top.scores, "max_margin": res.top.max_margin}
    if res.candidates is not None:  # coverage: the anchors each candidate beats, as list columns
        c = res.candidates
        offsets = pa.array(c.indptr, pa.int64())
        cols["anchor"] = pa.LargeListArray.from_arrays(offsets, pa.array(c.anchor, pa.int32()))
        cols["weight"] = pa.LargeListArray.from_arrays(offsets, pa.array(c.weight, pa.float64()))
    if res.top_cluster is not None:
        cols["cluster"] = res.top_cluster.astype(np.int64)
    write_parquet(pa.table(cols), work / "top" / f"part-{res.index:05d}.parquet")
    if nonce is not None:
        os.replace(_fenced(work / "parts", res.index, nonce), work / "parts" / f"part-{res.index:05d}.parquet")
    entry = manifest["shards"][str(res.index)] = {
        "rows": res.rows, "pairs": res.pairs, "seconds": res.seconds, "node": res.node, "pid": res.pid,
        "pairs_recomputed": res.recomputed, "pairs_per_second": res.pairs / max(res.seconds, 1e-9)}
    if res.candidates is not None:
        entry["next"] = res.candidates.next_key
    for name in ("cluster_counts", "cluster_hard"):
        if getattr(res, name) is not None:
            entry[name] = getattr(res, name).tolist()
    write_json(manifest, work / "manifest.json")


def _shard_done(work: Path, manifest: dict, i: int) -> bool:
    """Recorded in the manifest and both its files still there (a deleted part is redone)."""
    return (str(i) in manifest["shards"] and (work / "parts" / f"part-{i:05d}.parquet").exists()
            and (work / "top" / f"part-{i:05d}.parquet").exists())


def _read_top(work: Path, i: int) -> tuple[Ranked, np.ndarray | None, pa.Table]:
    t = pq.read_table(work / "top" / f"part-{i:05d}.parquet")
    cluster = t["cluster"].to_numpy() if "cluster" in t.column_names else None
    return Ranked(t["id"].to_numpy(), t["score"].to_numpy(), t["max_margin"].to_numpy()), cluster, t


def _read_candidates(work: Path, manifest: dict, i: int) -> Candidates:
    top, _, t = _read_top(work, i)
    offsets = t["anchor"].combine_chunks().offsets.to_numpy().astype(np.int64)
    nxt = manifest["shards"][str(i)]["next"]
    return Candidates(top, offsets,
                      t["anchor"].combine_chunks().flatten().to_numpy().astype(np.int32),
                      t["weight"].combine_chunks().flatten().to_numpy().astype(np.float64),
                      None if nxt is None else (float(nxt[0]), float(nxt[1]), int(nxt[2])))


def _finished_summary(out: Path, key: str) -> dict | None:
    summary = read_json(out / "summary.json")
    if (summary is None or summary.get("run_key") != key or not (out / "selection.parquet").exists()
            or not (out / "scores.parquet").exists()):
        return None
    log.info("%s: finished run with the same inputs and config found; skipping", out)
    return summary


def _finish(out, work, selection: Ranked, plan: Plan, cfg, inputs, key, t0, timings, manifest, backend_info,
            extra: dict | None = None):
    id_col = plan.tables.pool_id
    write_parquet(pa.table({id_col: pa.array(selection.ids, pa.int64()),
                            "score": pa.array(selection.scores, pa.float64()),
                            "rank": pa.array(np.arange(1, len(selection) + 1, dtype=np.int32), pa.int32())}),
                  out / "selection.parquet")
    _discard(out / "scores.parquet")
    for stray in (work / "parts").glob(".part-*"):  # parts of workers whose driver was killed
        stray.unlink()
    os.replace(work / "parts", out / "scores.parquet")
    _discard(out / "centres.npy")
    _discard(out / "thresholds.parquet")
    steps = sorted((work / "kmeans").glob("step-*.npy"))
    if steps:  # the cluster strategy's centres, (k, d) float64: the clusters in scores.parquet
        os.replace(steps[-1], out / "centres.npy")
    if (work / "thresholds.npy").exists():  # per anchor, in anchor id order: what "why selected" reads
        write_parquet(pa.table({plan.tables.anchor_id: pa.array(plan.anchors.ids, pa.int64()),
                                "threshold": np.load(work / "thresholds.npy")}), out / "thresholds.parquet")
    shards = [{"shard": int(i)} | v for i, v in sorted(manifest["shards"].items(), key=lambda kv: int(kv[0]))]
    pairs = sum(s["pairs"] for s in shards) + manifest.get("pairs_before", 0)  # coverage: earlier passes too
    timings["total_s"] = time.perf_counter() - t0
    score_s = timings.get("score_s", 0.0)
    summary = {
        "run_key": key, "inputs": dataclasses.asdict(inputs), "config": dataclasses.asdict(cfg), "seed": cfg.seed,
        "counts": {"pool": plan.n_pool, "paired_images": plan.n_paired_images, "paired_texts": plan.n_paired_texts,
                   "anchors": len(plan.anchors.ids), "selected": len(selection), "dim": plan.dim},
        "timings": timings, "pairs_scored": pairs,
        "pairs_recomputed": sum(s.get("pairs_recomputed", 0) for s in shards),  # low precision: float64 band
        "pairs_per_second": pairs / score_s if score_s else 0.0,
        "shards": shards, "backend": backend_info,
        "workers": backend_info.get("workers", []),  # per worker process: rows, shards, peak_rss_mib
    }
    if extra is not None:
        summary[cfg.strategy] = extra
    write_json(summary, out / "summary.json")
    shutil.rmtree(work, ignore_errors=True)
    log.info("selected %d of %d pool items in %.2fs (%.3g pairs/s); outputs in %s", len(selection), plan.n_pool,
             timings["total_s"], summary["pairs_per_second"], out)
    return summary
