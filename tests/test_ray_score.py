"""Sharded scoring on a real local Ray cluster: same output as the single-process command."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import write_inputs
from hnal_ray.cli import main
from hnal_ray.data.synthetic import make_example

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]
ray = pytest.importorskip("ray")



def run(paths, out, *extra, budget=7):
    args = ["score", "--paired-images", str(paths["paired_images"]), "--paired-texts",
            str(paths["paired_texts"]), "--pool", str(paths["pool"]), "--budget", str(budget), "--out", str(out)]
    assert main(args + [str(x) for x in extra]) == 0
    return out


def same_outputs(a, b, id_col="image_id"):
    for name in ("selection.parquet", "scores.parquet"):
        ta, tb = pq.read_table(a / name).sort_by(id_col), pq.read_table(b / name).sort_by(id_col)
        assert ta.schema == tb.schema and ta.to_pandas().equals(tb.to_pandas()), name  # NaN == NaN here


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    return {side: write_inputs(root / side, np.random.default_rng(11), n_pool=60, side=side)[0]
            for side in ("image", "text")}


@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("variant", [("surplus", 1), ("counting", 2),
                                     pytest.param(("counting", 1), marks=pytest.mark.slow),
                                     pytest.param(("surplus", 3), marks=pytest.mark.slow)])
def test_shards_equal_single_process(tmp_path, inputs, side, variant):
    weight, k = variant
    flags = ["--side", side, "--weight", weight, "--k", k]
    single = run(inputs[side], tmp_path / "single", *flags)
    id_col = "image_id" if side == "image" else "text_id"
    for shards in (1, 2, 3, 7):
        out = run(inputs[side], tmp_path / f"s{shards}", *flags, "--shards", shards)
        same_outputs(single, out, id_col)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["backend"]["backend"] == "ray" and len(summary["shards"]) == shards
        assert sum(s["rows"] for s in summary["shards"]) == 60
        assert all(s["pairs_per_second"] > 0 for s in summary["shards"])


@pytest.mark.parametrize("within", ["hardest", "random"])
def test_cluster_strategy_on_ray_actors_equals_single_process(tmp_path, inputs, within):
    flags = ["--strategy", "cluster", "--within", within, "--clusters", 5, "--cluster-sample", 40]
    single = run(inputs["image"], tmp_path / "single", *flags)
    same_outputs(single, run(inputs["image"], tmp_path / "two", *flags, "--shards", 2))


def test_corrupt_embedding_page_read_in_an_actor_is_exit_2(tmp_path, capsys):
    """Ids are fine (the driver's checks pass); the last row group's embedding page is corrupt, so the
    actor that loads it fails: one line naming the file and row group, nothing in --out."""
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(12), n_pool=60)
    b = bytearray(paths["pool"].read_bytes())
    footer = int.from_bytes(b[-8:-4], "little")
    end = len(b) - footer - 8
    for i in range(end - 120, end - 20):
        b[i] ^= 0x5A
    paths["pool"].write_bytes(bytes(b))
    capsys.readouterr()
    args = ["score", "--paired-images", str(paths["paired_images"]), "--paired-texts", str(paths["paired_texts"]),
            "--pool", str(paths["pool"]), "--budget", "7", "--shards", "2", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{paths['pool']}: row group" in err[0] and "cannot be read" in err[0]
    assert not (tmp_path / "out").exists()


def test_continuous_embeddings_bit_identical(tmp_path):
    p = make_example(tmp_path / "ex", n_images=300, n_pool=3000, n_pool_texts=10, dim=48)
    paths = {"paired_images": p["paired_images"], "paired_texts": p["paired_texts"], "pool": p["pool_images"]}
    single = run(paths, tmp_path / "single", "--k", 2, budget=50)
    same_outputs(single, run(paths, tmp_path / "s3", "--k", 2, "--shards", 3, budget=50))
    same_outputs(run(paths, tmp_path / "r", "--strategy", "random", budget=50),
                 run(paths, tmp_path / "r3", "--strategy", "random", "--shards", 3, budget=50))


def test_killed_actor_is_restarted_and_output_unchanged(tmp_path, inputs, monkeypatch):
    single = run(inputs["image"], tmp_path / "single")
    monkeypatch.setenv("HNAL_FAIL_SHARD", "1")
    out = run(inputs["image"], tmp_path / "faulty", "--shards", 3)
    same_outputs(single, out)
    summary = json.loads((out / "summary.json").read_text())
    started = [w["pid"] for w in summary["backend"]["workers"]]
    finished = [s["pid"] for s in summary["shards"]]
    assert finished[0] == started[0] and finished[2] == started[2]
    assert finished[1] != started[1]  # shard 1 was redone by a restarted actor process


def test_bad_shard_reports_one_line(tmp_path, inputs, capsys):
    import pyarrow as pa

    t = pq.read_table(inputs["image"]["pool"])
    emb = t["embedding"].to_pylist()
    emb[50] = [float("nan")] * 16
    bad = dict(inputs["image"], pool=tmp_path / "pool.parquet")
    pq.write_table(t.set_column(1, "embedding", pa.array(emb, pa.list_(pa.float32()))), bad["pool"])
    assert main(["score", "--paired-images", str(bad["paired_images"]), "--paired-texts", str(bad["paired_texts"]),
                 "--pool", str(bad["pool"]), "--budget", "3", "--shards", "3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "pool.parquet: column 'embedding' row 50 contains NaN or inf" in err[-1]
    assert not (tmp_path / "o").exists()


def test_interrupted_run_resumes_only_missing_shards(tmp_path, inputs):
    """The in-process backend shares the manifest logic: die in shard 2, delete shard 0's part, resume."""
    p = inputs["image"]
    undisturbed = run(p, tmp_path / "undisturbed")
    env = dict(os.environ, HNAL_FAIL_SHARD="2")
    # the CLI's in-process mode runs one shard; the Python API runs three local shards
    code = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "out"), json.dumps(
        {k: str(v) for k, v in p.items()})], env=env, capture_output=True, text=True, timeout=120)
    assert code.returncode == 17, code.stderr
    work = tmp_path / "out" / ".work"
    assert sorted(json.loads((work / "manifest.json").read_text())["shards"]) == ["0", "1"]
    assert not (tmp_path / "out" / "summary.json").exists()
    (work / "parts" / "part-00000.parquet").unlink()
    again = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "out"), json.dumps(
        {k: str(v) for k, v in p.items()})], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "shard 0:" in again.stderr and "shard 2:" in again.stderr and "shard 1:" not in again.stderr
    same_outputs(undisturbed, tmp_path / "out")


RESUME_SCRIPT = """
import json, logging, sys
from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.score.job import LocalBackend, run_score
logging.basicConfig(level=logging.INFO)
p = json.loads(sys.argv[2])
cfg = ScoreConfig(budget=7, shards=3)
run_score(ScoreInputs(p["paired_images"], p["paired_texts"], p["pool"]), cfg, sys.argv[1],
          lambda specs: LocalBackend(specs, "cpu"))
"""
