"""`hnal bench stream`: pools larger than memory. Scores a streamed synthetic pool (written once,
file by file) with N actors pulling shards, and prints per size: time, throughput against the
in-memory single-process kernel on the same machine, and each worker's peak resident memory."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from hnal_ray.bench.kernels import machine
from hnal_ray.config import ScoreConfig, ScoreInputs


@dataclass(frozen=True)
class StreamConfig:
    root: str                       # data and outputs go here (a disk with room for the largest pool)
    sizes: tuple[int, ...] = (1_000_000,)
    images: int = 3334              # paired images; ~3 captions each: ~10k paired texts (anchors)
    dim: int = 256
    actors: int = 2
    shard_rows: int = 1_000_000
    budget: int = 1000
    seed: int = 0


def pool_dir(cfg, n: int, name: str | None = None, **kw) -> Path:
    """The example data set with an n-row pool (written once, streamed file by file) under cfg.root
    (a StreamConfig or SelectBenchConfig); `name` and `kw` (to make_example) are select's."""
    from hnal_ray.data.synthetic import make_example

    d = Path(cfg.root) / (name or f"pool-{n}-d{cfg.dim}")
    if not (d / "done.json").exists():
        make_example(d, n_images=cfg.images, n_pool=n, n_pool_texts=10, dim=cfg.dim, seed=cfg.seed,
                     **kw)
        (d / "done.json").write_text(json.dumps({"pool": n}))
    return d


def in_memory(cfg: StreamConfig, data: Path) -> tuple[float, np.ndarray]:
    """The in-memory single-process path on the smallest pool: every row loaded, `score_pool` on the
    arrays, `select_top`. Returns (pairs per second of the kernel, selected ids)."""
    import torch

    from hnal_ray.io import read_embeddings
    from hnal_ray.score.scoring import score_pool
    from hnal_ray.score.selection import select_top
    from hnal_ray.score.thresholds import kth, negative_topk

    img = read_embeddings(data / "paired_images.parquet", "image_id")
    txt = read_embeddings(data / "paired_texts.parquet", "text_id", "image_id")
    order = np.argsort(txt.ids)
    xi = kth(negative_topk(txt.emb[order], txt.owner[order], img.emb, img.ids, 1), 1)
    pool = read_embeddings(data / "pool_images", "image_id")
    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    res = score_pool(pool.emb, txt.emb[order], xi, "surplus")
    rate = res.pairs / (time.perf_counter() - t)
    return rate, select_top(pool.ids, res.scores, res.max_margin, cfg.budget).ids


def run_stream_bench(cfg: StreamConfig, address: str | None = None) -> dict:
    from hnal_ray.cluster.actors import run_score_on_ray

    load0 = os.getloadavg()[0]
    rows = []
    for n in cfg.sizes:
        data = pool_dir(cfg, n)
        inputs = ScoreInputs(str(data / "paired_images.parquet"), str(data / "paired_texts.parquet"),
                             str(data / "pool_images"))
        out = Path(cfg.root) / f"out-{n}-a{cfg.actors}"
        shutil.rmtree(out, ignore_errors=True)  # a finished run would be skipped: time a fresh one
        score = ScoreConfig(budget=cfg.budget, shards=cfg.actors, shard_rows=cfg.shard_rows, address=address,
                            seed=cfg.seed)
        t = time.perf_counter()
        summary = run_score_on_ray(inputs, score, out)
        rows.append({"pool": n, "seconds": time.perf_counter() - t, "score_s": summary["timings"].get("score_s", 0.0),
                     "pairs": summary["pairs_scored"], "anchors": summary["counts"]["anchors"],
                     "pairs_per_second": summary["pairs_per_second"], "shards": len(summary["shards"]),
                     "workers": summary["workers"], "timings": summary["timings"],
                     "bytes_on_disk": sum(f.stat().st_size for f in (data / "pool_images").glob("*.parquet"))})
    n0 = cfg.sizes[0]
    rate, ids = in_memory(cfg, pool_dir(cfg, n0))
    streamed = pq.read_table(Path(cfg.root) / f"out-{n0}-a{cfg.actors}" / "selection.parquet")["image_id"].to_numpy()
    for r in rows:
        r["ratio_to_in_memory"] = r["pairs_per_second"] / rate
    return {"config": asdict(cfg), "rows": rows, "in_memory_pairs_per_second": rate,
            "same_selection_as_in_memory": bool(np.array_equal(ids, streamed)), "checked_pool": n0,
            "machine": machine(load0)}


def format_stream_table(res: dict) -> str:
    cfg, m = res["config"], res["machine"]
    lines = [f"hnal bench stream: d {cfg['dim']}, {cfg['actors']} actors, shards of {cfg['shard_rows']} rows | "
             f"{m['gpu'] or m['cpu']}, {m['cores']} cores, load {m['load_before']:.2f} -> {m['load_after']:.2f} | "
             f"in-memory score_pool {res['in_memory_pairs_per_second'] / 1e6:.0f} Mpair/s",
             f"{'pool':>10}{'GB':>7}{'anchors':>8}{'shards':>7}{'sec':>9}{'Mpair/s':>9}{'x in-mem':>9}"
             f"  peak RSS MiB per worker (rows, shards)"]
    for r in res["rows"]:
        workers = ", ".join(f"{w['peak_rss_mib']:.0f} ({w['rows']}, {w['shards']})" for w in r["workers"])
        lines.append(f"{r['pool']:>10}{r['bytes_on_disk'] / 1e9:>7.1f}{r['anchors']:>8}{r['shards']:>7}"
                     f"{r['seconds']:>9.1f}{r['pairs_per_second'] / 1e6:>9.0f}{r['ratio_to_in_memory']:>9.2f}  {workers}")
    lines.append(f"top-{cfg['budget']} of the {res['checked_pool']}-row pool equal to the in-memory path: "
                 f"{res['same_selection_as_in_memory']}")
    return "\n".join(lines)
