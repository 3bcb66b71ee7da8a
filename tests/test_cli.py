"""`hnal score` through its public entry: outputs against the dense reference, and bad input."""
import argparse
import json
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import dense_run, write_inputs
from hnal_ray.cli import main



def score_args(paths, out, *extra, budget=7):
    return ["score", "--paired-images", str(paths["paired_images"]), "--paired-texts", str(paths["paired_texts"]),
            "--pool", str(paths["pool"]), "--budget", str(budget), "--out", str(out), *extra]


@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("weight,k,batch", [("surplus", 1, "full"), ("counting", 1, "full"), ("surplus", 3, "full"),
                                             ("counting", 2, "5"), ("counting", 1, "4")])
def test_score_matches_dense_reference(tmp_path, side, weight, k, batch):
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(zlib.crc32(repr((side, weight, k, batch)).encode())),
                              side=side)
    out = tmp_path / "out"
    assert main(score_args(paths, out, "--side", side, "--weight", weight, "--k", str(k),
                           "--threshold-batch", batch, "--seed", "4", "--block-pool", "6",
                           "--block-anchor", "5")) == 0
    want_ids, want_scores = dense_run(raw, side, weight, k, 7, None if batch == "full" else int(batch), seed=4)
    id_col = "image_id" if side == "image" else "text_id"
    sel = pq.read_table(out / "selection.parquet")
    assert sel.column_names == [id_col, "score", "rank"]
    assert sel.schema.field("rank").type == pa.int32() and sel.schema.field("score").type == pa.float64()
    assert sel[id_col].to_pylist() == want_ids.tolist() and sel["rank"].to_pylist() == list(range(1, 8))
    np.testing.assert_allclose(sel["score"].to_numpy(), [want_scores[i] for i in want_ids], rtol=1e-6)
    scores = pq.read_table(out / "scores.parquet")
    assert sorted(scores[id_col].to_pylist()) == sorted(raw["pool_ids"].tolist())
    got = dict(zip(scores[id_col].to_pylist(), scores["score"].to_pylist()))
    np.testing.assert_allclose([got[i] for i in raw["pool_ids"]], [want_scores[i] for i in raw["pool_ids"]],
                               rtol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["pool"] == 40 and summary["counts"]["selected"] == 7
    assert summary["pairs_scored"] == 40 * summary["counts"]["anchors"] and summary["pairs_per_second"] > 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "scores.parquet", "selection.parquet", "summary.json",
                                                     "thresholds.parquet"]


def test_random_and_coreset(tmp_path):
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(1))
    assert main(score_args(paths, tmp_path / "r", "--strategy", "random", "--seed", "9")) == 0
    want, _ = dense_run(raw, "image", "surplus", 1, 7, seed=9, strategy="random")
    assert pq.read_table(tmp_path / "r" / "selection.parquet")["image_id"].to_pylist() == want.tolist()
    assert main(score_args(paths, tmp_path / "c", "--strategy", "coreset")) == 0
    sel = pq.read_table(tmp_path / "c" / "selection.parquet").to_pydict()
    assert len(set(sel["image_id"])) == 7 and sel["score"] == sorted(sel["score"], reverse=True)
    assert sel["score"][0] > 0


def test_rerun_skips_and_changed_config_recomputes(tmp_path, caplog):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(2))
    out = tmp_path / "out"
    assert main(score_args(paths, out)) == 0
    first = (out / "summary.json").read_text()
    with caplog.at_level("INFO"):
        assert main(score_args(paths, out)) == 0
    assert "skipping" in caplog.text and (out / "summary.json").read_text() == first
    caplog.clear()
    with caplog.at_level("INFO"):  # how the pool is cut and read does not change the outputs (issue 23)
        assert main(score_args(paths, out, "--shard-rows", "9", "--stream-rows", "4")) == 0
    assert "skipping" in caplog.text and (out / "summary.json").read_text() == first
    assert main(score_args(paths, out, "--k", "2")) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["k"] == 2


def test_console_script_runs(tmp_path):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(3))
    exe = [sys.executable, "-m", "hnal_ray.cli"]
    r = subprocess.run(exe + score_args(paths, tmp_path / "out"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["selected"] == 7


# ----------------------------------------------------------------------------------- bad input

def _rewrite(path, **cols):
    t = pq.read_table(path)
    for name, values in cols.items():
        if values is None:
            t = t.drop_columns([name])
        else:
            t = t.set_column(t.column_names.index(name), name, values)
    pq.write_table(t, path)


def _emb_with(path, row, vec):
    emb = np.array(pq.read_table(path)["embedding"].to_pylist(), dtype=object)
    rows = [list(e) for e in emb]
    rows[row] = vec
    return pa.array(rows, pa.list_(pa.float32()))


BAD = {
    "missing column": (lambda p: _rewrite(p["paired_images"], embedding=None), [], "paired_images.parquet",
                       "missing column 'embedding'"),
    "missing owner column": (lambda p: _rewrite(p["paired_texts"], image_id=None), [], "paired_texts.parquet",
                             "missing column 'image_id'"),
    "ragged": (lambda p: _rewrite(p["pool"], embedding=_emb_with(p["pool"], 5, [1.0] * 15)), [], "pool.parquet",
               "row 5 has length 15, expected 16"),
    "mismatched dims": (lambda p: _rewrite(p["pool"], embedding=pa.array([[1.0] * 8] * 40, pa.list_(pa.float32()))),
                        [], "pool.parquet", "row 0 has length 8, expected 16"),
    "nan": (lambda p: _rewrite(p["paired_texts"], embedding=_emb_with(p["paired_texts"], 3, [float("nan")] * 16)),
            [], "paired_texts.parquet", "row 3 contains NaN or inf"),
    "inf": (lambda p: _rewrite(p["pool"], embedding=_emb_with(p["pool"], 11, [float("inf")] + [0.0] * 15)),
            [], "pool.parquet", "row 11 contains NaN or inf"),
    "zero vector": (lambda p: _rewrite(p["pool"], embedding=_emb_with(p["pool"], 2, [0.0] * 16)),
                    [], "pool.parquet", "row 2 is the zero vector"),
    "duplicate image id": (lambda p: _rewrite(p["paired_images"], image_id=pa.array(
        [*pq.read_table(p["paired_images"])["image_id"].to_pylist()[:-1],
         pq.read_table(p["paired_images"])["image_id"].to_pylist()[0]], pa.int64())),
        [], "paired_images.parquet", "duplicate id"),
    "duplicate pool id": (lambda p: _rewrite(p["pool"], image_id=pa.array([5] * 40, pa.int64())), [],
                          "pool.parquet", "row 1: duplicate id 5"),
    "owner missing": (lambda p: _rewrite(p["paired_texts"], image_id=pa.array(
        [-1] + pq.read_table(p["paired_texts"])["image_id"].to_pylist()[1:], pa.int64())), [],
        "paired_texts.parquet", "column 'image_id' row 0: owner image -1 is not among the paired images"),
    "pool id already paired": (lambda p: _rewrite(p["pool"], image_id=pa.array(
        pq.read_table(p["paired_images"])["image_id"].to_pylist()[:1]
        + pq.read_table(p["pool"])["image_id"].to_pylist()[1:], pa.int64())), [], "pool.parquet",
        "row 0: id"),
    "empty pool": (lambda p: pq.write_table(pq.read_table(p["pool"]).slice(0, 0), p["pool"]), [], "pool.parquet",
                   "the pool is empty"),
    "budget < 1": (None, ["--budget", "0"], "--budget", "must be >= 1"),
    "budget > pool": (None, ["--budget", "41"], "pool.parquet", "--budget 41 is larger than the pool (40 rows"),
    "k < 1": (None, ["--k", "0"], "--k", "must be >= 1"),
    "k above the negatives": (None, ["--k", "300"], "--k 300",
                              "have fewer than 300 negatives among the paired set, so their threshold is -inf"),
    "k above a mini-batch's negatives": (None, ["--threshold-batch", "2", "--k", "5"], "--k 5",
                                         "negatives in its mini-batch of 2"),
    "missing file": (lambda p: p["pool"].unlink(), [], "pool.parquet", "no such file"),
    "id not int": (lambda p: _rewrite(p["pool"], image_id=pa.array([str(i) for i in range(40)])), [],
                   "pool.parquet", "column 'image_id' must be int64"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_and_nothing_written(tmp_path, capsys, case):
    spoil, extra, where, what = BAD[case]
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(4))
    if spoil:
        spoil(paths)
    args = score_args(paths, tmp_path / "out")
    if extra and extra[0] in args:
        args[args.index(extra[0]) + 1] = extra[1]
    elif extra:
        args += extra
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and where in err[0] and what in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_input_inside_out_is_refused_and_kept(tmp_path, capsys):
    """Issue 23 (4): a pool folder named like an output, inside --out, is not replaced."""
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(4))
    pool = tmp_path / "out" / "scores.parquet"
    pool.mkdir(parents=True)
    (pool / "part-0.parquet").write_bytes(paths["pool"].read_bytes())
    paths["pool"] = pool
    before = (pool / "part-0.parquet").read_bytes()
    assert main(score_args(paths, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the pool input" in err[0] and "is inside --out" in err[0], err
    assert (pool / "part-0.parquet").read_bytes() == before and sorted(p.name for p in pool.iterdir()) == ["part-0.parquet"]


def test_pool_folder_symlinks_are_followed_or_refused(tmp_path, capsys):
    """Issue 23 (5): a symlinked sub-folder of a pool folder is read (all rows scored); a dangling
    symlink is one error naming it, not a silently smaller pool."""
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(4))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    t = pq.read_table(paths["pool"])
    pq.write_table(t.slice(0, 20), elsewhere / "b.parquet")
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(t.slice(20), pool / "a.parquet")
    (pool / "more").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(pool, target_is_directory=True)      # a cycle is read once
    paths["pool"] = pool
    assert main(score_args(paths, tmp_path / "out")) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"]["pool"] == 40
    (pool / "gone.parquet").symlink_to(tmp_path / "missing.parquet")
    assert main(score_args(paths, tmp_path / "out2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone.parquet: a broken symlink" in err[0], err
    assert not (tmp_path / "out2").exists()


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_command_has_help():
    """`--help` formats for every (nested) command: a bare % in a help string breaks argparse."""
    from hnal_ray.cli import build_parser
    commands = dict(_subparsers(build_parser()))
    assert {"score", "loop", "bench compare", "data emoji"} <= set(commands)
    for name, sub in commands.items():
        assert sub.format_help(), name
