"""`hnal bench loop CONFIG`: run the active-learning loop of a config from scratch (data and features
cached as the config says) and print wall time per stage and in total, with the machine's load."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from hnal_ray.bench.kernels import machine
from hnal_ray.io import InputError
from hnal_ray.loop.stats import STAGES


def run_loop_bench(config: str, overrides: list[str], out: str | None, address: str | None) -> dict:
    """One fresh run of the loop; returns JSON-ready figures (rounds counted once each)."""
    from hnal_ray.cluster.session import ray_session
    from hnal_ray.loop.config import load_loop_config
    from hnal_ray.loop.driver import run_loop

    cfg = load_loop_config(config, overrides)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(out) if out else Path(tmp) / "run"
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(f"{run_dir}: the benchmark needs a fresh (missing or empty) --out")
        t = time.perf_counter()
        with ray_session(address):
            start_s = time.perf_counter() - t
            run_loop(cfg, run_dir)
        total = time.perf_counter() - t
        rounds = pq.read_table(run_dir / "timings.parquet").to_pylist()
        wall = json.loads((run_dir / "wall_time.json").read_text())
    unique = {("seed-set" if r["round"] == 0 else r["strategy"], r["seed"], r["round"]): r for r in rounds}
    stages = {k: sum(r[k] for r in unique.values()) for k in STAGES + ("round_s",)}
    return {"config": config, "overrides": overrides, "rounds": len(unique), "seeds": len(cfg.seeds),
            "strategies": len(cfg.strategies), "concurrency": cfg.concurrency, "stage_s": stages,
            "ray_start_s": start_s, "prepare_s": wall["prepare_s"], "rounds_wall_s": wall["rounds_s"],
            "total_s": total, "machine": machine(load0)}


def format_loop_table(res: dict) -> str:
    m, st = res["machine"], res["stage_s"]
    lines = [f"hnal bench loop {res['config']} {' '.join(res['overrides'])}".rstrip(),
             f"{res['rounds']} rounds ({res['strategies']} strategies x {res['seeds']} seeds), concurrency "
             f"{res['concurrency']} | {m['gpu'] or m['cpu']}, {m['cores']} cores, load {m['load_before']:.2f} -> "
             f"{m['load_after']:.2f}",
             f"{'stage':<28}{'seconds':>10}{'per round':>11}{'share':>8}"]
    for k in STAGES:
        lines.append(f"{k[:-2]:<28}{st[k]:>10.1f}{st[k] / res['rounds']:>11.2f}{st[k] / st['round_s']:>8.1%}")
    lines += [f"{'rounds, summed (CPU-side)':<28}{st['round_s']:>10.1f}{st['round_s'] / res['rounds']:>11.2f}",
              f"{'start Ray':<28}{res['ray_start_s']:>10.1f}",
              f"{'data + features (prepare)':<28}{res['prepare_s']:>10.1f}",
              f"{'rounds, wall':<28}{res['rounds_wall_s']:>10.1f}",
              f"{'total, wall':<28}{res['total_s']:>10.1f}"]
    return "\n".join(lines)
