"""`hnal bench score` as an experiment: every path, the Ray rows, checks against the exact path and
the dense reference, and the machine it ran on; returns JSON-ready figures."""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from hnal_ray.bench.paths import PAIRED, BenchConfig, make_data, measure

log = logging.getLogger(__name__)


def compare(ref: dict, got: dict, budget: int) -> dict:
    """Scores against the exact dense path (to float32 rounding) and the top-B overlap; a selection
    still agrees when it differs only between items tied to within that rounding."""
    from hnal_ray.score.selection import select_top

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
        plan += [("low_precision", {"precision": p}, [cfg.pool]) for p in cfg.precisions if not p.startswith("exact")]
        for p in (p.removeprefix("exact-") for p in cfg.precisions if p.startswith("exact-")):
            plan += [("gemm_low", {"precision": p}, [cfg.pool]), ("exact_low", {"precision": p}, [cfg.pool])]
        runs = []
        for name, params, ns in plan:
            log.info("bench: %s %s pool %s", name, params, ns)
            runs += [(name, params, n, r) for n, r in zip(ns, measure(name, params, cfg, files, ns))]
        ray_rows = []
        if cfg.actors != (0,):
            from hnal_ray.cluster.bench import ray_scaling

            ray_rows = ray_scaling(files, ray_pool, cfg.weight, cfg.device, list(cfg.actors) or None, cfg.repeat)
        out = summarize(cfg, data, runs, ray_rows)
        out["oracle_max_abs_err"] = oracle_check(cfg, files, next(r for p, _, _, r in runs if p == "score_pool"))
    out["machine"] = machine(load0)
    return out


def oracle_check(cfg: BenchConfig, files: dict, exact: dict, rows: int = 256) -> float:
    """The exact dense path against hnal_ray.score.reference (float64, full matrix) on the first pool rows."""
    from hnal_ray.score.reference import dense_scores

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
