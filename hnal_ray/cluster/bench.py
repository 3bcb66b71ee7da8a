"""The Ray rows of `hnal bench score`: the exact kernel sharded over 1, 2, ... actors, and its scaling.

Each actor is a thin shell: it loads its own pool rows (and the anchors, thresholds) from the .npy
files the benchmark wrote, runs hnal_ray.score.scoring.score_pool and reports its time and peak memory.
Every actor gets the same resources whatever their number (CPU threads = cores // most actors, or a
GPU, shared when there are fewer GPUs than actors), so T1 / (n Tn) is the scaling efficiency.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import ray

from hnal_ray.device import peak_mib, pick_device, reset_peak, set_threads
from hnal_ray.score.scoring import score_pool

from hnal_ray.cluster.session import ray_session


@ray.remote
class BenchShard:
    def __init__(self, files: dict, rows: tuple[int, int], device: str, threads: int):
        set_threads(threads)
        self.device = pick_device(device)
        self.pool = np.array(np.load(files["pool"], mmap_mode="r")[rows[0]:rows[1]])
        self.anchors, self.thresholds = np.load(files["anchors"]), np.load(files["thresholds"])

    def ready(self) -> int:
        return os.getpid()

    def score(self, weight: str) -> dict:
        base = reset_peak()
        t = time.perf_counter()
        res = score_pool(self.pool, self.anchors, self.thresholds, weight, self.device)
        return {"seconds": time.perf_counter() - t, "peak_mib": peak_mib() - base,
                "scores": res.scores, "max_margin": res.max_margin}


def ray_scaling(files: dict, n_pool: int, weight: str, device: str, counts: list[int] | None = None,
                repeat: int = 1) -> list[dict]:
    """Score pool rows [0, n_pool) with n actors for each n in `counts`: fan out, then ray.get once
    (the fastest of `repeat` rounds). Returns per n: wall seconds (fan-out to last result, actors
    already loaded), the slowest shard's kernel seconds, the largest per-actor peak memory, and the
    merged scores/max_margin."""
    out = []
    with ray_session():
        res = ray.cluster_resources()
        # default: 1 and 2 actors, then doubling while there is a GPU (if any, else a CPU) for each
        most = max(int(res.get("GPU", 0) or res.get("CPU", 1)), 2)
        counts = counts or [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= most]
        gpus, cpus = res.get("GPU", 0), max(1.0, res.get("CPU", 1) // max(counts))
        for n in counts:
            opts = {"num_gpus": min(1.0, gpus / n), "num_cpus": 1} if gpus and device != "cpu" else {"num_cpus": cpus}
            dev = "cuda" if opts.get("num_gpus") else "cpu"
            cuts = np.linspace(0, n_pool, n + 1).astype(int)
            actors = [BenchShard.options(**opts).remote(files, (int(cuts[i]), int(cuts[i + 1])), dev,
                                                        max(1, math.floor(opts["num_cpus"]))) for i in range(n)]
            ray.get([a.ready.remote() for a in actors])
            wall, parts = np.inf, []
            for _ in range(repeat):
                t = time.perf_counter()
                got = ray.get([a.score.remote(weight) for a in actors])
                if time.perf_counter() - t < wall:
                    wall, parts = time.perf_counter() - t, got
            for a in actors:
                ray.kill(a)
            out.append({"actors": n, "seconds": wall, "kernel_s": max(p["seconds"] for p in parts),
                        "peak_mib": max(p["peak_mib"] for p in parts), "resources": opts,
                        "scores": np.concatenate([p["scores"] for p in parts]),
                        "max_margin": np.concatenate([p["max_margin"] for p in parts])})
    return out
