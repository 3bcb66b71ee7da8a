"""The timed paths of `hnal bench score`: seeded data, the GEMM roofline and every scoring path,
each run at several pool sizes (optionally in a fresh interpreter, for an honest peak memory)."""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hnal_ray.device import peak_mib, pick_device, reset_peak

log = logging.getLogger(__name__)
BLOCKS = ((4096, 8192), (4096, 1024))  # score_pool's and score_pool_dense's default blocks


@dataclass(frozen=True)
class BenchConfig:
    pool: int = 200_000
    texts: int = 20_000
    dim: int = 256
    captions: int = 5               # paired texts per paired image
    data_clusters: int = 100        # categories of the synthetic images
    spread: float = 0.15            # hnal_ray.data.synthetic.clustered_embeddings spread
    caption_noise: float = 0.1
    k: int = 1
    weight: str = "surplus"
    budget: int = 1000
    clusters: int = 256             # k-means clusters of the texts (pruned mode)
    sizes: tuple[int, ...] = ()     # pool sizes for memory growth; () = pool/16, pool/4, pool
    naive_pool: int = 16384         # largest pool of the full-matrix numpy peer (run at /4, /2, x1)
    approx: tuple[tuple[int, int], ...] = ((1, 32), (4, 64), (16, 128))  # (nprobe, top_m)
    actors: tuple[int, ...] = ()    # () = 1, 2, then doubling while there are cores/GPUs; (0,) = no Ray
    ray_pool: int = 0               # 0 = the middle growth size
    precisions: tuple[str, ...] = ()  # low-precision variants: bf16, tf32 (rounded: recall reported);
                                      # exact-fp16, exact-bf16 (hnal_ray.score.lowprec, + the bare GEMM)
    device: str = "auto"
    seed: int = 0
    repeat: int = 1                 # time each path this many times, keep the fastest (noisy machines)
    isolate: bool = True            # False: every path in this process (tests)

    def growth_sizes(self) -> list[int]:
        return sorted(set(self.sizes or (self.pool // 16, self.pool // 4, self.pool)))


def make_data(cfg: BenchConfig, out_dir: Path) -> dict:
    """Seeded clustered images, captions near their image, thresholds by the kernel as built; .npy files."""
    from hnal_ray.data.synthetic import clustered_embeddings, unit
    from hnal_ray.score.thresholds import kth, negative_topk

    rng = np.random.default_rng(cfg.seed)
    n_img = -(-cfg.texts // cfg.captions)
    emb, _ = clustered_embeddings(rng, n_img + cfg.pool, cfg.dim, cfg.data_clusters, cfg.spread)
    owner = np.arange(cfg.texts) // cfg.captions
    texts = unit(emb[owner] + cfg.caption_noise * 3 / np.sqrt(cfg.dim) * rng.standard_normal((cfg.texts, cfg.dim)))
    t = time.perf_counter()
    thresholds = kth(negative_topk(texts, owner, emb[:n_img], np.arange(n_img), cfg.k), cfg.k)
    files = {name: str(out_dir / f"{name}.npy") for name in ("pool", "anchors", "thresholds")}
    for path, arr in zip(files.values(), (emb[n_img:], texts, thresholds)):
        np.save(path, arr)
    return {"files": files, "thresholds_s": time.perf_counter() - t, "paired_images": n_img}


def gemm_seconds(pool: np.ndarray, anchors: np.ndarray, block: tuple[int, int], device,
                 dtype=None) -> float:
    """The roofline: the same (n_u, d) x (d, n_a) product, in (block_pool, block_anchor) blocks into a
    reused buffer, pool blocks moved to the device (as `dtype`, float32 by default) as the kernels
    move them. Wall seconds."""
    import torch

    bp, ba = block
    dtype = dtype or torch.float32
    p_all, a = torch.from_numpy(pool), torch.from_numpy(anchors).to(device, dtype)
    buf = torch.empty(min(bp, len(pool)) * min(ba, len(a)), device=device, dtype=dtype)
    t = time.perf_counter()
    for u0 in range(0, len(pool), bp):
        p = p_all[u0:u0 + bp].to(device, dtype)
        for a0 in range(0, len(a), ba):
            torch.matmul(p, a[a0:a0 + ba].T, out=buf[: len(p) * len(a[a0:a0 + ba])].view(len(p), -1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _gemm(pool, anchors, xi, cfg, device):
    times = {"%dx%d" % b: gemm_seconds(pool, anchors, b, device) for b in BLOCKS}
    return None, None, {"seconds": min(times.values()), "blocks_s": times}


def _score_pool(pool, anchors, xi, cfg, device):
    from hnal_ray.score.scoring import score_pool

    res = score_pool(pool, anchors, xi, cfg.weight, device)
    return res.scores, res.max_margin, {}


def _dense(pool, anchors, xi, cfg, device, precision="float32"):
    """pruning.score_pool_dense; tf32 lets float32 matmuls round to TF32, bf16 rounds the inputs."""
    import torch

    from hnal_ray.score.pruning import score_pool_dense

    old = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        res = score_pool_dense(pool, anchors, xi, cfg.weight, device, dtype=dtype)
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cuda.matmul.allow_tf32 = old[1]
    return res.scores, res.max_margin, {}


def _pruned(pool, anchors, xi, cfg, device):
    from hnal_ray.score.pruning import cluster_anchors, score_pool_pruned

    t = time.perf_counter()
    clusters = cluster_anchors(anchors, cfg.clusters, cfg.seed)
    kmeans_s = time.perf_counter() - t
    res = score_pool_pruned(pool, anchors, xi, cfg.weight, device, clusters=clusters)
    return res.scores, res.max_margin, {"kmeans_s": kmeans_s, "skipped": res.skipped,
                                        "margin_only": res.pairs_margin / max(res.pairs, 1)}


def _numpy(pool, anchors, xi, cfg, device):
    """The naive peer: the full (n_u, n_a) matrix, then threshold and sum."""
    margin = pool @ anchors.T - xi
    w = np.maximum(margin, 0) if cfg.weight == "surplus" else margin > 0
    return w.sum(axis=1, dtype=np.float64), margin.max(axis=1), {}


def _faiss_range(pool, anchors, xi, cfg, device, block=32768):
    """FAISS range_search for [u, 1] . [t, -xi_t] > 0: the hard pairs and their margins (max_margin of
    items without one is unknown: -inf)."""
    import faiss

    index = faiss.IndexFlatIP(anchors.shape[1] + 1)
    index.add(np.ascontiguousarray(np.hstack([anchors, -xi[:, None]]), dtype=np.float32))
    scores, mm = np.zeros(len(pool)), np.full(len(pool), -np.inf, np.float32)
    for u0 in range(0, len(pool), block):
        q = np.hstack([pool[u0:u0 + block], np.ones((len(pool[u0:u0 + block]), 1), np.float32)])
        lims, margin, _ = index.range_search(np.ascontiguousarray(q), 0.0)
        item = np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64)))
        w = margin if cfg.weight == "surplus" else np.ones_like(margin)
        scores[u0:u0 + len(q)] = np.bincount(item, weights=w.astype(np.float64), minlength=len(q))
        np.maximum.at(mm, u0 + item, margin)
    return scores, mm, {}


def _approx(pool, anchors, xi, cfg, device, nprobe=8, top_m=64):
    from hnal_ray.bench.approx import build_margin_index, score_pool_approx

    t = time.perf_counter()
    index = build_margin_index(anchors, xi, seed=cfg.seed)
    build_s = time.perf_counter() - t
    res = score_pool_approx(pool, anchors, xi, cfg.weight, top_m, nprobe, index=index)
    return res.scores, res.max_margin, {"build_s": build_s, "nlist": index.nlist}


def _exact_low(pool, anchors, xi, cfg, device, precision="fp16"):
    """hnal_ray.score.lowprec: fp16/bf16 GEMM, float64 recomputation of the undecided band (exact)."""
    import torch

    from hnal_ray.score.lowprec import score_pool_lowprec

    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    res = score_pool_lowprec(pool, anchors, xi, cfg.weight, device, low=low)
    return res.scores, res.max_margin, {"band_share": res.band_share}


def _gemm_low(pool, anchors, xi, cfg, device, precision="fp16"):
    """The bare product with fp16/bf16 inputs (tensor cores on a GPU), blocked like `_exact_low`."""
    import torch

    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return None, None, {"seconds": gemm_seconds(pool, anchors, BLOCKS[0], device, low)}


PAIRED = {"score_pool": BLOCKS[0], "dense_fused": BLOCKS[1], "pruned": BLOCKS[1], "exact_low": BLOCKS[0]}
PATHS = {"gemm": _gemm, "score_pool": _score_pool, "dense_fused": _dense, "pruned": _pruned,
         "numpy_dense": _numpy, "faiss_range": _faiss_range, "approx": _approx, "low_precision": _dense,
         "exact_low": _exact_low, "gemm_low": _gemm_low}


def run_path(name: str, params: dict, cfg: BenchConfig, files: dict, sizes: list[int]) -> list[dict]:
    """Run one path at each pool size (ascending): warm up, then `repeat` times reset the peak RSS and time
    it; keeps the fastest time and the largest peak. The exact kernels are paired: each timing follows
    a bare GEMM in their own blocks, and ratio_to_gemm is the median of these back-to-back ratios, so
    that another process's load shifts both sides alike."""
    import torch

    device, out = pick_device(cfg.device), []
    anchors, xi = np.load(files["anchors"]), np.load(files["thresholds"])
    for n in sizes:
        pool = np.array(np.load(files["pool"], mmap_mode="r")[:n])
        PATHS[name](pool[:256], anchors, xi, cfg, device, **params)  # thread pools, BLAS, FAISS up
        best, ratios = {}, []
        for _ in range(cfg.repeat):
            gemm_s = gemm_seconds(pool, anchors, PAIRED[name], device) if name in PAIRED else None
            base = reset_peak()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            scores, mm, extra = PATHS[name](pool, anchors, xi, cfg, device, **params)
            res = {"seconds": time.perf_counter() - t, "peak_mib": peak_mib() - base, "scores": scores,
                   "max_margin": mm} | extra
            if device.type == "cuda":
                res["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            peak = max(res["peak_mib"], best.get("peak_mib", 0.0))
            best = (res if res["seconds"] < best.get("seconds", np.inf) else best) | {"peak_mib": peak}
            ratios += [gemm_s / res["seconds"]] if gemm_s else []
        out.append(best | ({"ratio_to_gemm": float(np.median(ratios))} if ratios else {}))
        del pool
    return out


_CHILD = ("import pickle, sys; from hnal_ray.bench.paths import BenchConfig, run_path; "
          "n, p, c, f, s = pickle.load(open(sys.argv[1], 'rb')); "
          "pickle.dump(run_path(n, p, BenchConfig(**c), f, s), open(sys.argv[2], 'wb'))")


def measure(name, params, cfg, files, sizes) -> list[dict]:
    """run_path here, or in a fresh interpreter (nothing inherited: the peak RSS is the path's own)."""
    if not cfg.isolate:
        return run_path(name, params, cfg, files, sizes)
    with tempfile.TemporaryDirectory() as d:
        args, res = Path(d, "args.pkl"), Path(d, "res.pkl")
        args.write_bytes(pickle.dumps((name, params, dataclasses.asdict(cfg), files, sizes)))
        # a fixed mmap threshold: freed blocks go back to the OS, so the next pool size starts clean
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        subprocess.run([sys.executable, "-c", _CHILD, str(args), str(res)], check=True, env=env)
        return pickle.loads(res.read_bytes())
