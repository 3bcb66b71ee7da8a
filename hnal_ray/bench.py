"""`hnal bench score`: exact scoring against the same-shape GEMM (the machine's limit) and the naive
peers (full-matrix numpy, FAISS range_search), the pruned and approximate modes, and Ray scaling.

All paths score the same seeded clustered data, each path in a fresh interpreter (peak memory =
peak RSS above the loaded inputs), and are checked against the exact dense path as built.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
BLOCKS = ((4096, 8192), (4096, 1024))  # score_pool's and score_pool_dense's default blocks


@dataclass(frozen=True)
class BenchConfig:
    pool: int = 200_000
    texts: int = 20_000
    dim: int = 256
    captions: int = 5               # paired texts per paired image
    data_clusters: int = 100        # categories of the synthetic images
    spread: float = 0.15            # hnal_ray.synthetic.clustered_embeddings spread
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
    precisions: tuple[str, ...] = ()  # low-precision variants: bf16, tf32
    device: str = "auto"
    seed: int = 0
    repeat: int = 1                 # time each path this many times, keep the fastest (noisy machines)
    isolate: bool = True            # False: every path in this process (tests)

    def growth_sizes(self) -> list[int]:
        return sorted(set(self.sizes or (self.pool // 16, self.pool // 4, self.pool)))


def reset_peak() -> float:
    """Current RSS (MiB), after resetting this process's peak RSS (VmHWM) to it: Linux clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: memory columns read NaN
        pass
    return _proc_status("VmRSS")


def peak_mib() -> float:
    return _proc_status("VmHWM")


def _proc_status(key: str) -> float:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    return next((int(ln.split()[1]) / 1024 for ln in lines if ln.startswith(key + ":")), float("nan"))


def make_data(cfg: BenchConfig, out_dir: Path) -> dict:
    """Seeded clustered images, captions near their image, thresholds by the kernel as built; .npy files."""
    from hnal_ray.synthetic import clustered_embeddings, unit
    from hnal_ray.thresholds import kth, negative_topk

    rng = np.random.default_rng(cfg.seed)
    n_img = -(-cfg.texts // cfg.captions)
    emb, _ = clustered_embeddings(rng, n_img + cfg.pool, cfg.dim, cfg.data_clusters, cfg.spread)
    owner = np.arange(cfg.texts) // cfg.captions
    texts = unit(emb[owner] + cfg.caption_noise * 3 / np.sqrt(cfg.dim) * rng.standard_normal((cfg.texts, cfg.dim)))
    t = time.perf_counter()
    thresholds = kth(negative_topk(texts, owner, emb[:n_img], np.arange(n_img), cfg.k), cfg.k)
    files = {}
    for name, arr in (("pool", emb[n_img:]), ("anchors", texts), ("thresholds", thresholds)):
        np.save(out_dir / f"{name}.npy", arr)
        files[name] = str(out_dir / f"{name}.npy")
    return {"files": files, "thresholds_s": time.perf_counter() - t, "paired_images": n_img}


def gemm_seconds(pool: np.ndarray, anchors: np.ndarray, block: tuple[int, int], device) -> float:
    """The roofline: the same (n_u, d) x (d, n_a) product, in (block_pool, block_anchor) blocks into a
    reused buffer, pool blocks moved to the device as the kernels move them. Wall seconds."""
    import torch

    bp, ba = block
    p_all, a = torch.from_numpy(pool), torch.from_numpy(anchors).to(device)
    buf = torch.empty(min(bp, len(pool)) * min(ba, len(a)), device=device)
    t = time.perf_counter()
    for u0 in range(0, len(pool), bp):
        p = p_all[u0:u0 + bp].to(device)
        for a0 in range(0, len(a), ba):
            torch.matmul(p, a[a0:a0 + ba].T, out=buf[: len(p) * len(a[a0:a0 + ba])].view(len(p), -1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _gemm(pool, anchors, xi, cfg, device):
    times = {"%dx%d" % b: gemm_seconds(pool, anchors, b, device) for b in BLOCKS}
    return None, None, {"seconds": min(times.values()), "blocks_s": times}


def _score_pool(pool, anchors, xi, cfg, device):
    from hnal_ray.scoring import score_pool

    res = score_pool(pool, anchors, xi, cfg.weight, device)
    return res.scores, res.max_margin, {}


def _dense(pool, anchors, xi, cfg, device, precision="float32"):
    """pruning.score_pool_dense; tf32 lets float32 matmuls round to TF32, bf16 rounds the inputs."""
    import torch

    from hnal_ray.pruning import score_pool_dense

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
    from hnal_ray.pruning import cluster_anchors, score_pool_pruned

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
    from hnal_ray.approx import build_margin_index, score_pool_approx

    t = time.perf_counter()
    index = build_margin_index(anchors, xi, seed=cfg.seed)
    build_s = time.perf_counter() - t
    res = score_pool_approx(pool, anchors, xi, cfg.weight, top_m, nprobe, index=index)
    return res.scores, res.max_margin, {"build_s": build_s, "nlist": index.nlist}


PAIRED = {"score_pool": BLOCKS[0], "dense_fused": BLOCKS[1], "pruned": BLOCKS[1]}
PATHS = {"gemm": _gemm, "score_pool": _score_pool, "dense_fused": _dense, "pruned": _pruned,
         "numpy_dense": _numpy, "faiss_range": _faiss_range, "approx": _approx, "low_precision": _dense}


def run_path(name: str, params: dict, cfg: BenchConfig, files: dict, sizes: list[int]) -> list[dict]:
    """Run one path at each pool size (ascending): warm up, then `repeat` times reset the peak RSS and time
    it; keeps the fastest time and the largest peak. The exact kernels are paired: each timing follows
    a bare GEMM in their own blocks, and ratio_to_gemm is the median of these back-to-back ratios, so
    that another process's load shifts both sides alike."""
    import torch

    from hnal_ray.device import pick_device

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


_CHILD = ("import pickle, sys; from hnal_ray.bench import BenchConfig, run_path; "
          "n, p, c, f, s = pickle.load(open(sys.argv[1], 'rb')); "
          "pickle.dump(run_path(n, p, BenchConfig(**c), f, s), open(sys.argv[2], 'wb'))")


def _measure(name, params, cfg, files, sizes) -> list[dict]:
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


def compare(ref: dict, got: dict, budget: int) -> dict:
    """Scores against the exact dense path (to float32 rounding) and the top-B overlap; a selection
    still agrees when it differs only between items tied to within that rounding."""
    from hnal_ray.selection import select_top

    ids = np.arange(len(ref["scores"]), dtype=np.int64)
    err = np.abs(np.nan_to_num(got["scores"] - ref["scores"], nan=0.0))
    tol = 1e-5 * np.maximum(1.0, np.abs(np.nan_to_num(ref["scores"], posinf=0.0)))
    want = select_top(ids, ref["scores"], ref["max_margin"], budget).ids
    sel = select_top(ids, got["scores"], got["max_margin"], budget).ids
    moved = np.setxor1d(want, sel)
    cutoff = ref["scores"][want[-1]] if len(want) else 0.0
    return {"max_abs_err": float(err.max(initial=0.0)), "scores_agree": bool((err <= tol).all()),
            "selection_overlap": len(np.intersect1d(want, sel)) / max(len(want), 1),
            "selection_agrees": bool((np.abs(ref["scores"][moved] - cutoff) <= tol[moved]).all())}


def run_bench(cfg: BenchConfig) -> dict:
    """Every row, as a JSON-ready dict (no arrays)."""
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        data = make_data(cfg, Path(d))
        files, sizes = data["files"], cfg.growth_sizes()
        naive = sorted({max(1, cfg.naive_pool // 4), max(1, cfg.naive_pool // 2), cfg.naive_pool})
        ray_pool = cfg.ray_pool or sizes[len(sizes) // 2]
        plan = [("gemm", {}, sizes), ("score_pool", {}, sorted(set(sizes + naive + [ray_pool])))]
        plan += [(p, {}, sizes) for p in ("dense_fused", "pruned", "faiss_range")] + [("numpy_dense", {}, naive)]
        plan += [("approx", {"nprobe": p, "top_m": m}, [cfg.pool]) for p, m in cfg.approx]
        plan += [("low_precision", {"precision": p}, [cfg.pool]) for p in cfg.precisions]
        runs = []
        for name, params, ns in plan:
            log.info("bench: %s %s pool %s", name, params, ns)
            runs += [(name, params, n, r) for n, r in zip(ns, _measure(name, params, cfg, files, ns))]
        ray_rows = []
        if cfg.actors != (0,):
            from hnal_ray.cluster.bench import ray_scaling

            ray_rows = ray_scaling(files, ray_pool, cfg.weight, cfg.device, list(cfg.actors) or None, cfg.repeat)
        out = summarize(cfg, data, runs, ray_rows)
        out["oracle_max_abs_err"] = oracle_check(cfg, files, next(r for p, _, _, r in runs if p == "score_pool"))
    out["machine"] = machine(load0)
    return out


def oracle_check(cfg: BenchConfig, files: dict, exact: dict, rows: int = 256) -> float:
    """The exact dense path against hnal_ray.reference (float64, full matrix) on the first pool rows."""
    from hnal_ray.reference import dense_scores

    pool = np.load(files["pool"], mmap_mode="r")[: min(rows, len(exact["scores"]))]
    want, _ = dense_scores(pool, np.load(files["anchors"]), np.load(files["thresholds"]), cfg.weight)
    return float(np.abs(exact["scores"][: len(want)] - want).max(initial=0.0))


def summarize(cfg: BenchConfig, data: dict, runs: list, ray_rows: list) -> dict:
    ref = {n: r for name, _, n, r in runs if name == "score_pool"}
    gemm = {n: r["seconds"] for name, _, n, r in runs if name == "gemm"}
    rows = []
    for name, params, n, r in runs:
        pairs = n * cfg.texts
        row = {"path": name, **params, "pool": n, "pairs": pairs, "pairs_per_s": pairs / r["seconds"],
               "gflops": 2 * pairs * cfg.dim / r["seconds"] / 1e9} | {k: v for k, v in r.items()
                                                                      if k not in ("scores", "max_margin")}
        if n in gemm and name not in PAIRED:  # the paired kernels carry their own, measured back to back
            row["ratio_to_gemm"] = gemm[n] / r["seconds"]
        if r["scores"] is not None and name != "score_pool":
            row |= compare(ref[n], r, cfg.budget) | {"speedup": ref[n]["seconds"] / r["seconds"]}
        rows.append(row)
    main = {r["path"]: r for r in rows if r["pool"] == cfg.pool}
    out = {"config": dataclasses.asdict(cfg), "data": data | {"files": None}, "rows": rows, "ray": [],
           "ratio_to_gemm": main["score_pool"]["ratio_to_gemm"],
           "dense_fused_ratio_to_gemm": main["dense_fused"]["ratio_to_gemm"],
           "pruned_ratio_to_gemm": main["pruned"]["ratio_to_gemm"], "pairs_skipped": main["pruned"]["skipped"]}
    for r in ray_rows:
        one = ray_rows[0]["seconds"]
        out["ray"].append({k: v for k, v in r.items() if k not in ("scores", "max_margin")} |
                          {"pool": len(r["scores"]), "speedup": one / r["seconds"],
                           "efficiency": one / (r["actors"] * r["seconds"])} |
                          compare(ref[len(r["scores"])], r, cfg.budget))
    return out


def machine(load0: float) -> dict:
    import torch

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_before": load0, "load_after": os.getloadavg()[0]}


def format_table(res: dict) -> str:
    """The printed table: one line per path and pool size, then the Ray rows and the headline ratios."""
    cfg, m = res["config"], res["machine"]
    lines = [f"hnal bench score: texts {cfg['texts']} x d {cfg['dim']}, {cfg['weight']}, k={cfg['k']}, spread "
             f"{cfg['spread']}, seed {cfg['seed']} | {m['gpu'] or m['cpu']}, {m['cores']} cores, load "
             f"{m['load_before']:.2f} -> {m['load_after']:.2f} | thresholds {res['data']['thresholds_s']:.2f}s",
             f"{'path':<22}{'pool':>8}{'sec':>8}{'Mpair/s':>9}{'GFLOP/s':>9}{'xGEMM':>7}{'peakMiB':>9}"
             f"{'max|ds|':>9}{'topB':>7}  notes"]
    for r in res["rows"] + [r | {"path": f"ray x{r['actors']}"} for r in res["ray"]]:
        label = r["path"] + "".join(f" {c}{r[k]}" for k, c in (("nprobe", "p"), ("top_m", "m"), ("precision", ""))
                                    if k in r)
        notes = ", ".join(f"{k} {r[k]:.3g}" for k in ("skipped", "kmeans_s", "build_s", "speedup", "efficiency",
                                                      "gpu_peak_mib") if k in r and r["path"] != "score_pool")
        pairs = r["pool"] * cfg["texts"]
        lines.append(f"{label:<22}{r['pool']:>8}{r['seconds']:>8.2f}{pairs / r['seconds'] / 1e6:>9.0f}"
                     f"{2e-9 * pairs * cfg['dim'] / r['seconds']:>9.1f}"
                     f"{_fmt(r.get('ratio_to_gemm'), '7.2f')}{r['peak_mib']:>9.0f}"
                     f"{_fmt(r.get('max_abs_err'), '9.1e')}{_fmt(r.get('selection_overlap'), '7.3f')}  {notes}")
    lines.append("  ".join(f"{k} {res[k]:.3g}" for k in ("ratio_to_gemm", "dense_fused_ratio_to_gemm",
                                                         "pruned_ratio_to_gemm", "pairs_skipped",
                                                         "oracle_max_abs_err")))
    return "\n".join(lines)


def _fmt(v, spec: str) -> str:
    return f"{v:>{spec}}" if v is not None else " " * int(spec.split(".")[0])


def _tuple(cast):
    return lambda v: tuple(cast(x) for x in v.split(",") if x)


def add_bench_parser(subparsers) -> None:
    """Register `bench score` on the `hnal` command line; flags mirror BenchConfig."""
    bench = subparsers.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("score", help="exact scoring vs the same-shape GEMM, naive peers, pruned, approx, Ray")
    for f in dataclasses.fields(BenchConfig):
        if f.type in ("int", "float"):
            p.add_argument("--" + f.name.replace("_", "-"), type=int if f.type == "int" else float, default=f.default)
    p.add_argument("--weight", default="surplus", choices=["surplus", "counting"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--sizes", type=_tuple(int), default=(), help="pool sizes for memory growth, e.g. 1000,4000")
    p.add_argument("--approx", type=_tuple(lambda x: tuple(map(int, x.split(":")))), default=BenchConfig.approx,
                   help="nprobe:top_m settings, e.g. 1:32,4:64")
    p.add_argument("--actors", type=_tuple(int), default=(), help="Ray actor counts, e.g. 1,2; 0: no Ray")
    p.add_argument("--precisions", type=_tuple(str), default=(), help="low-precision variants: bf16,tf32")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="every path in this process")
    p.add_argument("--json", default=None, help="also write the figures here as JSON")
    p.set_defaults(func=cmd_bench_score)


def cmd_bench_score(a: argparse.Namespace) -> int:
    from hnal_ray.io import write_json

    res = run_bench(BenchConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(BenchConfig)}))
    print(format_table(res))  # the benchmark's output is the table
    if a.json:
        write_json(res, a.json)
    return 0


if __name__ == "__main__":  # `python -m hnal_ray.bench score ...`, the same as `hnal bench score ...`
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    add_bench_parser((_parser := argparse.ArgumentParser()).add_subparsers(dest="command", required=True))
    sys.exit((_args := _parser.parse_args(["bench", *sys.argv[1:]])).func(_args))
