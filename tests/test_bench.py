"""`hnal bench score` in CI size: every path agrees with the exact dense one (timings are not checked)."""
import argparse
import json

import numpy as np
import pytest

from hnal_ray.bench.cli import add_bench_parser
from hnal_ray.bench.paths import BenchConfig, make_data, measure, run_path

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

TINY = ["--pool", "16000", "--texts", "600", "--dim", "32", "--captions", "3", "--data-clusters", "8",
        "--clusters", "12", "--budget", "40", "--naive-pool", "16000", "--approx", "1:16,1000:600",
        "--actors", "1,2", "--precisions", "bf16,tf32", "--no-isolate"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run through the command line (Ray started once, with 2 CPUs): (JSON figures, printed table)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never attach to a stray cluster
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "score", *TINY, "--json", str(out)])
    import contextlib
    import io

    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        assert args.func(args) == 0
    ray.shutdown()
    return json.loads(out.read_text()), table.getvalue()


def rows(res, path):
    return [r for r in res["rows"] if r["path"] == path]


def test_exact_paths_agree_with_the_dense_path(bench):
    res, _ = bench
    assert res["oracle_max_abs_err"] < 1e-5  # the exact dense path against hnal_ray.score.reference
    for path in ("dense_fused", "pruned", "numpy_dense", "faiss_range"):
        assert rows(res, path), path
        for r in rows(res, path):
            assert r["scores_agree"] and r["selection_agrees"], (path, r)
            assert r["max_abs_err"] < 1e-5


def test_headline_figures_and_the_memory_column(bench):
    res, table = bench
    for key in ("ratio_to_gemm", "pruned_ratio_to_gemm", "dense_fused_ratio_to_gemm", "pairs_skipped"):
        assert res[key] > 0 and f"{key} {res[key]:.3g}" in table
    assert 0.3 < res["pairs_skipped"] <= 1  # clustered data: the bound prunes
    sizes = {r["pool"] for r in rows(res, "score_pool")}
    assert {1000, 4000, 16000} <= sizes and {4000, 8000} <= sizes
    for path in ("gemm", "score_pool", "dense_fused", "pruned", "faiss_range", "numpy_dense"):
        assert len(rows(res, path)) >= 3 and all(r["peak_mib"] == r["peak_mib"] for r in rows(res, path))
    assert res["machine"]["cores"] >= 1 and res["config"]["pool"] == 16000
    # the memory column sees what a path holds: the numpy peer materialises the (pool, texts) float32
    # margin matrix, so its peak is at least that matrix and grows with the pool
    # margin matrix: at 16,000 x 600 (37 MiB, past glibc's largest mmap threshold, so fresh pages the
    # process's peak RSS must count) its peak is at least that matrix
    largest = max(rows(res, "numpy_dense"), key=lambda r: r["pool"])
    assert largest["pool"] == 16000 and largest["peak_mib"] >= 16000 * 600 * 4 / 2**20, largest


def test_approx_and_low_precision_report_recall(bench):
    res, _ = bench
    approx = {r["nprobe"]: r for r in rows(res, "approx")}
    assert 0 <= approx[1]["selection_overlap"] <= 1 and approx[1]["speedup"] > 0
    assert approx[1000]["selection_overlap"] == 1.0  # every list probed, top-M = all texts: exact
    for r in rows(res, "low_precision"):
        assert 0.5 <= r["selection_overlap"] <= 1, r


def test_ray_rows_scale_and_agree(bench):
    res, table = bench
    assert [r["actors"] for r in res["ray"]] == [1, 2]
    for r in res["ray"]:
        assert r["scores_agree"] and r["selection_overlap"] == 1.0 and r["pool"] == 4000
        assert r["efficiency"] > 0 and f"ray x{r['actors']} " in table


def test_isolated_run_matches_in_process(tmp_path):
    """The fresh-process runner returns the same scores as a call in this process."""
    cfg = BenchConfig(pool=400, texts=90, dim=16, captions=3, data_clusters=4, clusters=4, budget=5)
    files = make_data(cfg, tmp_path)["files"]
    here = run_path("pruned", {}, cfg, files, [100, 400])[-1]
    there = measure("pruned", {}, cfg, files, [100, 400])[-1]
    np.testing.assert_array_equal(here["scores"], there["scores"])
    np.testing.assert_array_equal(here["max_margin"], there["max_margin"])
    assert there["peak_mib"] >= 0 and there["skipped"] == here["skipped"]
