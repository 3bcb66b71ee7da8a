"""Sharded scoring on a real local Ray cluster: same output as the single-process command."""
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import write_inputs
from hnal_ray.cli import main
from hnal_ray.data.synthetic import make_example
from hnal_ray.io import row_group_starts
from hnal_ray.score.plan import cut_rows

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
@pytest.mark.parametrize("variant", [("surplus", 1), pytest.param(("counting", 2), marks=pytest.mark.full),
                                     pytest.param(("counting", 1), marks=pytest.mark.slow),
                                     pytest.param(("surplus", 3), marks=pytest.mark.slow)])
def test_shards_equal_single_process(tmp_path, inputs, side, variant):
    weight, k = variant
    flags = ["--side", side, "--weight", weight, "--k", k]
    single = run(inputs[side], tmp_path / "single", *flags)
    id_col = "image_id" if side == "image" else "text_id"
    for actors, shard_rows in ((1, 1_000_000), (2, 21), (3, 7), (2, 5)):  # 1 to 12 shards on 1 to 3 actors
        out = run(inputs[side], tmp_path / f"s{actors}-{shard_rows}", *flags, "--shards", actors,
                  "--shard-rows", shard_rows, "--stream-rows", 3)
        same_outputs(single, out, id_col)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["backend"]["backend"] == "ray" and len(summary["workers"]) == actors
        assert len(summary["shards"]) == len(cut_rows(row_group_starts(inputs[side]["pool"]), shard_rows))
        assert sum(s["rows"] for s in summary["shards"]) == 60 and max(s["rows"] for s in summary["shards"]) <= shard_rows
        assert sum(w["shards"] for w in summary["workers"]) == len(summary["shards"])
        assert all(w["peak_rss_mib"] > 0 for w in summary["workers"])
        assert all(s["pairs_per_second"] > 0 for s in summary["shards"])


@pytest.mark.parametrize("within", ["hardest", "random"])
def test_cluster_strategy_on_ray_actors_equals_single_process(tmp_path, inputs, within):
    flags = ["--strategy", "cluster", "--within", within, "--clusters", 5, "--cluster-sample", 40]
    single = run(inputs["image"], tmp_path / "single", *flags)
    same_outputs(single, run(inputs["image"], tmp_path / "two", *flags, "--shards", 2))


def test_coverage_on_ray_actors_equals_single_process(tmp_path, inputs):
    """Candidates from actors (too few at first: the driver asks again) give the in-process picks."""
    flags = ["--strategy", "coverage", "--candidates", 1]
    single = run(inputs["image"], tmp_path / "single", *flags)
    same_outputs(single, run(inputs["image"], tmp_path / "two", *flags, "--shards", 2, "--shard-rows", 7))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["backend"]["backend"] == "ray" and summary["timings"]["candidates_per_shard"] > 1


@pytest.mark.parametrize("strategy", ["probcover", "maxherding"])
def test_generalized_coverage_on_ray_actors_equals_single_process(tmp_path, inputs, strategy):
    """ProbCover / MaxHerding candidates from 2 actors over 9 shards (too few at first) give the
    in-process picks and the same per-item bounds."""
    flags = ["--strategy", strategy, "--candidates", 1]
    single = run(inputs["image"], tmp_path / "single", *flags)
    same_outputs(single, run(inputs["image"], tmp_path / "two", *flags, "--shards", 2, "--shard-rows", 7))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["backend"]["backend"] == "ray" and summary["timings"]["candidates_per_shard"] > 1


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
    same_outputs(single, run(paths, tmp_path / "s3", "--k", 2, "--shards", 3, "--shard-rows", 500, budget=50))
    same_outputs(run(paths, tmp_path / "r", "--strategy", "random", budget=50),
                 run(paths, tmp_path / "r3", "--strategy", "random", "--shards", 3, "--shard-rows", 700, budget=50))


def test_killed_actor_is_restarted_and_only_its_shard_redone(tmp_path, inputs):
    import cloudpickle

    import faults
    from hnal_ray.cluster.actors import RayBackend
    from hnal_ray.config import ScoreConfig, ScoreInputs
    from hnal_ray.score.job import run_score

    single = run(inputs["image"], tmp_path / "single")
    cloudpickle.register_pickle_by_value(faults)  # the actors get the faulty worker class by value
    cfg = ScoreConfig(budget=7, shards=3, shard_rows=21, stream_rows=7)
    p, out, marker = inputs["image"], tmp_path / "faulty", tmp_path / "died-in-shard-1"
    run_score(ScoreInputs(str(p["paired_images"]), str(p["paired_texts"]), str(p["pool"])), cfg, out,
              lambda: RayBackend(3, cfg, worker_cls=faults.dies_once_in_shard(1, marker)))
    same_outputs(single, out)
    summary = json.loads((out / "summary.json").read_text())
    died = int(marker.read_text())  # the process that died in shard 1
    final = {w["pid"]: w for w in summary["workers"]}
    assert len(summary["shards"]) == 3 and died not in final
    assert summary["shards"][1]["pid"] != died and summary["shards"][1]["pid"] in final
    # every shard was scored once by a live worker: the others were not redone
    assert sorted(w["shards"] for w in final.values()) == [1, 1, 1]


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
    import faults

    # three shards in this process, one after another; the process dies in shard 2
    script = faults.prelude(f"die_in_shard_in_process(2, {str(tmp_path / 'died')!r})") + RESUME_SCRIPT
    code = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out"), json.dumps(
        {k: str(v) for k, v in p.items()})], capture_output=True, text=True, timeout=120)
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
cfg = ScoreConfig(budget=7, shard_rows=21)  # three shards of the 60-row pool, in this process
run_score(ScoreInputs(p["paired_images"], p["paired_texts"], p["pool"]), cfg, sys.argv[1],
          lambda: LocalBackend("cpu"))
"""


@pytest.mark.parametrize("within", ["typical", pytest.param("central", marks=pytest.mark.full)])
def test_cluster_selection_is_the_same_for_any_shards_and_actors(tmp_path, inputs, within):
    """The k-means fit (Lloyd steps on the actors), the assignment and TypiClust's picks: the same
    centres and selection in-process and on 1 or 2 actors taking 1, 2 or 5 shards."""
    flags = ["--strategy", "cluster", "--quota", "uncovered", "--within", within, "--clusters", 12,
             "--max-points-per-centroid", 3, "--typical-cap", 4, "--seed", 2]
    single = run(inputs["image"], tmp_path / "single", *flags)
    for actors, shard_rows in ((1, 1_000_000), (2, 30), (2, 12), (1, 12)):
        out = run(inputs["image"], tmp_path / f"s{actors}-{shard_rows}", *flags, "--shards", actors,
                  "--shard-rows", shard_rows, "--stream-rows", 4)
        same_outputs(single, out)
        assert np.array_equal(np.load(out / "centres.npy"), np.load(single / "centres.npy"))
        summary = json.loads((out / "summary.json").read_text())
        assert len(summary["workers"]) == actors and summary["timings"]["kmeans_s"] > 0


def test_no_more_actors_than_shards(tmp_path, inputs):
    """Issue 23 (7): --shards 6 on a pool of one shard starts one actor, not six."""
    out = run(inputs["image"], tmp_path / "one", "--shards", 6)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["shards"]) == 1 and len(summary["workers"]) == 1
