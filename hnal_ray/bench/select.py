"""`hnal bench select`: the recommended (TypiClust) selection at pool scale against the Surplus
hard-negative score of the same inputs, in the same run: the time of each stage, the peak memory of
the driver and of each actor, and the fit's recovery of known clusters on a Gaussian mixture."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hnal_ray.bench.kernels import machine
from hnal_ray.bench.stream import pool_dir
from hnal_ray.config import ScoreConfig, ScoreInputs


@dataclass(frozen=True)
class SelectBenchConfig:
    root: str                         # data and outputs (room for the largest pool: ~1 GB per 1M rows at d 256)
    sizes: tuple[int, ...] = (1_000_000,)
    images: int = 100_000             # paired images (1-5 captions each: the Surplus anchors)
    budget: int = 10_000
    clusters: int = 0                 # 0: TypiClust's k = paired images + budget
    dim: int = 256
    true_clusters: int = 1000         # the synthetic pool's clusters
    actors: int = 2
    shard_rows: int = 250_000
    surplus: bool = True              # also time the Surplus hard-negative score (the ratio's denominator)
    quality: int = 0                  # rows of the Gaussian-mixture recovery check (0: skip), d 64
    seed: int = 0


STAGES = (("sample", "kmeans_sample_s"), ("fit", "kmeans_start_s"), ("lloyd", "lloyd"), ("assign", "score_s"),
          ("covered", "covered_s"), ("typical", "typical_s"))


def _timed_run(inputs: ScoreInputs, score: ScoreConfig, out: Path) -> dict:
    from hnal_ray.cluster.actors import run_score_on_ray
    from hnal_ray.device import peak_mib, reset_peak

    shutil.rmtree(out, ignore_errors=True)  # a finished run would be skipped: time a fresh one
    reset_peak()
    t = time.perf_counter()
    summary = run_score_on_ray(inputs, score, out)
    return {"seconds": time.perf_counter() - t, "driver_peak_mib": peak_mib(), "timings": summary["timings"],
            "workers": [{"peak_rss_mib": w["peak_rss_mib"], "rows": w["rows"]} for w in summary["workers"]],
            "pairs": summary["pairs_scored"], "anchors": summary["counts"]["anchors"]}


def run_select_bench(cfg: SelectBenchConfig, address: str | None = None) -> dict:
    """One Ray session for every run, so no run's time includes starting Ray (each starts its actors)."""
    from hnal_ray.cluster.session import ray_session

    with ray_session(address):
        load0 = os.getloadavg()[0]
        rows = []
        for n in cfg.sizes:
            data = pool_dir(cfg, n, f"select-{n}-p{cfg.images}-d{cfg.dim}-c{cfg.true_clusters}",
                            n_clusters=cfg.true_clusters)
            inputs = ScoreInputs(str(data / "paired_images.parquet"),
                                 str(data / "paired_texts.parquet"), str(data / "pool_images"))
            common = dict(budget=cfg.budget, shards=cfg.actors, shard_rows=cfg.shard_rows,
                          address=address, seed=cfg.seed)
            typical = ScoreConfig(strategy="cluster", quota="uncovered", within="typical",
                                  clusters=cfg.clusters, **common)
            typ = _timed_run(inputs, typical, Path(cfg.root) / f"out-{n}-typical")
            sur = _timed_run(inputs, ScoreConfig(**common), Path(cfg.root) / f"out-{n}-surplus") \
                if cfg.surplus else None
            rows.append({"pool": n, "recommended": typ, "surplus": sur,
                         "ratio": typ["seconds"] / sur["seconds"] if sur else None})
        quality = recovery(cfg, address) if cfg.quality else None
        return {"config": asdict(cfg), "rows": rows, "quality": quality, "machine": machine(load0)}


def recovery(cfg: SelectBenchConfig, address: str | None) -> dict:
    """A pool of `quality` rows (d 64) around `true_clusters` well-separated unit centres, clustered by
    the same job into as many clusters: the adjusted Rand index of its clusters against the truth."""
    from hnal_ray.data.synthetic import unit
    from hnal_ray.io import embedding_array, write_parquet

    d = Path(cfg.root) / f"mixture-{cfg.quality}-c{cfg.true_clusters}"
    if not (d / "done.json").exists():
        rng = np.random.default_rng(cfg.seed)
        centres = unit(rng.standard_normal((cfg.true_clusters, 64)))
        for i, lo in enumerate(range(0, cfg.quality, 250_000)):
            n = min(250_000, cfg.quality - lo)
            label = rng.integers(0, cfg.true_clusters, n)
            emb = unit(centres[label] + 0.03 * rng.standard_normal((n, 64)).astype(np.float32))
            write_parquet(pa.table({"image_id": np.arange(lo, lo + n, dtype=np.int64) + 10**7,
                                    "embedding": embedding_array(emb), "label": label}), d / "pool" / f"part-{i:03d}.parquet",
                          row_group_size=65536)
        paired = unit(centres[:2] + 0.03 * rng.standard_normal((2, 64)).astype(np.float32))
        write_parquet(pa.table({"image_id": np.array([1, 2]), "embedding": embedding_array(paired)}), d / "pi.parquet")
        write_parquet(pa.table({"text_id": np.array([1, 2]), "image_id": np.array([1, 2]),
                                "embedding": embedding_array(paired)}), d / "pt.parquet")
        (d / "done.json").write_text("{}")
    inputs = ScoreInputs(str(d / "pi.parquet"), str(d / "pt.parquet"), str(d / "pool"))
    run = _timed_run(inputs, ScoreConfig(budget=10, strategy="cluster", within="central", clusters=cfg.true_clusters,
                                         shards=cfg.actors, shard_rows=cfg.shard_rows, address=address, seed=cfg.seed),
                     d / "out")
    got = pq.read_table(d / "out" / "scores.parquet", columns=["image_id", "cluster"]).sort_by("image_id")
    truth = pq.read_table(d / "pool", columns=["image_id", "label"]).sort_by("image_id")
    return {"rows": cfg.quality, "clusters": cfg.true_clusters, "seconds": run["seconds"],
            "adjusted_rand": adjusted_rand(truth["label"].to_numpy(), got["cluster"].to_numpy())}


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings, from their contingency table."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    pairs = np.unique(ai.astype(np.int64) * (bi.max() + 1) + bi, return_counts=True)[1].astype(np.float64)
    comb = lambda x: float((x * (x - 1) / 2).sum())  # noqa: E731
    index = comb(pairs)
    rows, cols = comb(np.bincount(ai).astype(np.float64)), comb(np.bincount(bi).astype(np.float64))
    expected = rows * cols / comb(np.array([len(a)], np.float64))
    return (index - expected) / ((rows + cols) / 2 - expected)


def format_select_table(res: dict) -> str:
    cfg, m = res["config"], res["machine"]
    lines = [f"hnal bench select: d {cfg['dim']}, {cfg['images']} paired images, B {cfg['budget']}, "
             f"k {cfg['clusters'] or 'paired + B'}, {cfg['actors']} actors, shards of {cfg['shard_rows']} | "
             f"{m['gpu'] or m['cpu']}, {m['cores']} cores, load {m['load_before']:.2f} -> {m['load_after']:.2f}",
             f"{'pool':>10}{'path':>13}" + "".join(f"{name:>9}" for name, _ in STAGES) +
             f"{'total':>9}{'x Surplus':>10}{'driver MiB':>11}  actor peak MiB"]
    for r in res["rows"]:
        for path in ("recommended", "surplus"):
            run = r[path]
            if run is None:
                continue
            t = run["timings"]
            t = t | {"lloyd": sum(x for k, x in t.items() if k.startswith("lloyd_step"))}
            cells = "".join(f"{t[key]:>9.1f}" if t.get(key) else f"{'-':>9}" for _, key in STAGES)
            ratio = f"{r['ratio']:>10.2f}" if path == "recommended" and r["ratio"] else f"{'':>10}"
            actors = ", ".join(f"{w['peak_rss_mib']:.0f}" for w in run["workers"])
            lines.append(f"{r['pool']:>10}{path:>13}{cells}{run['seconds']:>9.1f}{ratio}"
                         f"{run['driver_peak_mib']:>11.0f}  {actors}")
    lines.append("stages in seconds: sample (the driver's share of the fit sample), fit (FAISS start), lloyd (exact steps "
                 "on the actors), assign (the scoring pass: every pool row's cluster; for surplus: the score), "
                 "covered (paired items per cluster), typical (TypiClust's picks); total includes thresholds and merge")
    q = res.get("quality")
    if q:
        lines.append(f"recovery: {q['rows']} rows x 64 around {q['clusters']} known centres -> adjusted Rand index "
                     f"{q['adjusted_rand']:.4f} ({q['seconds']:.1f} s)")
    return "\n".join(lines)
