"""The `hnal bench` command line (also `python -m hnal_ray.bench score ...`)."""
from __future__ import annotations

import argparse
import dataclasses

from hnal_ray.bench.paths import BenchConfig


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
    lp = bench.add_parser("loop", help="wall time per stage and in total of a loop config, run from scratch")
    lp.add_argument("config", help="run YAML, e.g. jobs/emoji.yaml (its data and features are reused if built)")
    lp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for `hnal loop`")
    lp.add_argument("--out", default=None, help="keep the run here (a fresh directory); default: a temporary one")
    lp.add_argument("--address", default=None)
    lp.add_argument("--json", default=None, help="also write the figures here as JSON")
    lp.set_defaults(func=cmd_bench_loop)
    cp = bench.add_parser("compare", help="run B minus run A per strategy and round, paired by seed (95%% CI)")
    cp.add_argument("run_a", help="a loop output directory (its metrics.parquet)")
    cp.add_argument("run_b", help="another, with the same strategy names and seeds")
    cp.add_argument("--metric", default="r1_sum", help="a test metric column (r1_sum, rsum, ...)")
    cp.set_defaults(func=cmd_bench_compare)
    tp = bench.add_parser("table", help="one table from loop runs of one config over disjoint seed ranges (pooled)")
    tp.add_argument("runs", nargs="+", help="loop output directories that differ only in their seeds")
    tp.add_argument("--baseline", default="random")
    tp.add_argument("--metric", default="r1_sum")
    tp.set_defaults(func=cmd_bench_table)
    ch = bench.add_parser("choose", help="the selection protocol's choice rule (docs/selection.md) over regimes")
    ch.add_argument("regimes", nargs="+", metavar="NAME=RUN[,RUN...]",
                    help="a regime's name and its loop run(s) (pooled over disjoint seeds)")
    ch.add_argument("--baseline", default="random")
    ch.add_argument("--metric", default="r1_sum")
    ch.set_defaults(func=cmd_bench_choose)
    st = bench.add_parser("stream", help="pools larger than memory: streamed shards, peak RSS per worker")
    st.add_argument("--root", required=True, help="where the synthetic pools and outputs go (needs the disk space)")
    st.add_argument("--sizes", type=_tuple(int), default=(1_000_000,), help="pool sizes, e.g. 1000000,3000000")
    st.add_argument("--dim", type=int, default=256)
    st.add_argument("--images", type=int, default=3334, help="paired images (about 3 captions each)")
    st.add_argument("--actors", type=int, default=2)
    st.add_argument("--shard-rows", type=int, default=1_000_000)
    st.add_argument("--budget", type=int, default=1000)
    st.add_argument("--address", default=None)
    st.add_argument("--json", default=None, help="also write the figures here as JSON")
    st.set_defaults(func=cmd_bench_stream)
    from hnal_ray.bench.select import SelectBenchConfig
    sp = bench.add_parser("select", help="the recommended (TypiClust) selection at pool scale vs the Surplus score")
    sp.add_argument("--root", required=True, help="where the synthetic pools and outputs go (needs the disk space)")
    for f in dataclasses.fields(SelectBenchConfig):
        if f.name == "sizes":
            sp.add_argument("--sizes", type=_tuple(int), default=f.default, help="pool sizes, e.g. 1000000,10000000")
        elif f.type in ("int", "bool") and f.name != "root":
            sp.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    sp.add_argument("--address", default=None)
    sp.add_argument("--json", default=None, help="also write the figures here as JSON")
    sp.set_defaults(func=cmd_bench_select)


def _report(res: dict, table: str, json_path: str | None) -> int:
    """Print the benchmark's table (its output) and, with --json, write its figures there."""
    from hnal_ray.io import write_json

    print(table)
    if json_path:
        write_json(res, json_path)
    return 0


def _config(cls, a: argparse.Namespace):
    """`cls` from the flags named as its fields (others keep their defaults); bools from ints."""
    return cls(**{f.name: bool(getattr(a, f.name)) if f.type == "bool" else getattr(a, f.name)
                  for f in dataclasses.fields(cls) if hasattr(a, f.name)})


def cmd_bench_score(a: argparse.Namespace) -> int:
    from hnal_ray.bench.kernels import run_bench
    from hnal_ray.bench.table import format_table

    res = run_bench(_config(BenchConfig, a))
    return _report(res, format_table(res), a.json)


def cmd_bench_loop(a: argparse.Namespace) -> int:
    from hnal_ray.bench.loop import format_loop_table, run_loop_bench

    res = run_loop_bench(a.config, a.set, a.out, a.address)
    return _report(res, format_loop_table(res), a.json)


def cmd_bench_stream(a: argparse.Namespace) -> int:
    from hnal_ray.bench.stream import StreamConfig, format_stream_table, run_stream_bench

    res = run_stream_bench(_config(StreamConfig, a), a.address)
    return _report(res, format_stream_table(res), a.json)


def cmd_bench_table(a: argparse.Namespace) -> int:
    from hnal_ray.bench.study import pooled_rows, study_table

    print(study_table(pooled_rows(a.runs)[0], a.baseline, a.metric))
    return 0


def cmd_bench_choose(a: argparse.Namespace) -> int:
    from hnal_ray.bench.study import choose, format_choice, pooled_rows
    from hnal_ray.io import InputError

    regimes = {}
    for item in a.regimes:
        name, sep, runs = item.partition("=")
        if not sep or not runs:
            raise InputError(f"expected NAME=RUN[,RUN...], got {item!r}")
        regimes[name] = pooled_rows(runs.split(","))[0]
    print(format_choice(choose(regimes, a.baseline, a.metric)))
    return 0


def cmd_bench_select(a: argparse.Namespace) -> int:
    from hnal_ray.bench.select import SelectBenchConfig, format_select_table, run_select_bench

    res = run_select_bench(_config(SelectBenchConfig, a), a.address)
    return _report(res, format_select_table(res), a.json)


def cmd_bench_compare(a: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from hnal_ray.io import InputError
    from hnal_ray.loop.stats import compare_runs

    runs = []
    for d in (a.run_a, a.run_b):
        path = f"{d}/metrics.parquet"
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a finished loop run's metrics ({exc})") from None
        if rows and a.metric not in rows[0]:
            raise InputError(f"{path}: no column {a.metric!r}")
        runs.append(rows)
    diffs = compare_runs(*runs, metric=a.metric)
    if not diffs:
        raise InputError(f"{a.run_a} and {a.run_b} share no (strategy, seed, round)")
    print(f"{a.metric}: {a.run_b} minus {a.run_a}, paired by seed")
    print("| strategy | round | seeds | B minus A | paired 95% CI |")
    print("|---|---|---|---|---|")
    for d in diffs:
        print(f"| {d['strategy']} | {d['round']} | {d['seeds']} | {d['diff']:+.1f} | [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}] |")
    return 0
