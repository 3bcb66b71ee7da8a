"""No stale answer, no traceback, one writer per output: `hnal score` against changed inputs, a held
--out, unusable outputs, corrupt pages, big ids, config mistakes and Ctrl-C."""
import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import dense_run, write_inputs
from hnal_ray.cli import main
from hnal_ray.io import embedding_array


def score_args(paths, out, *extra, budget=7):
    return ["score", "--paired-images", str(paths["paired_images"]), "--paired-texts", str(paths["paired_texts"]),
            "--pool", str(paths["pool"]), "--budget", str(budget), "--out", str(out), *[str(x) for x in extra]]


def swap_same_size_same_mtime(path, raw, rng):
    """Rewrite the pool with other embeddings, byte size and mtime kept (as `cp -p` of another export)."""
    st = path.stat()
    raw["pool_emb"] = rng.choice(np.array([-1.0, 1.0], np.float32), raw["pool_emb"].shape)
    t = pq.read_table(path)
    order = np.argsort(np.argsort(t["image_id"].to_numpy()))
    emb = embedding_array(raw["pool_emb"][np.argsort(raw["pool_ids"])][order]).cast(t["embedding"].type)
    pq.write_table(t.set_column(1, "embedding", emb), path, compression="none", use_dictionary=False,
                   write_statistics=False, row_group_size=7)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def plain_inputs(root, seed):
    """Inputs written uncompressed, so a rewrite with other values keeps the file size."""
    paths, raw = write_inputs(root, np.random.default_rng(seed), n_pool=40)
    for p in paths.values():
        pq.write_table(pq.read_table(p), p, compression="none", use_dictionary=False, write_statistics=False,
                       row_group_size=7)
    return paths, raw


def selected(out):
    return pq.read_table(out / "selection.parquet")["image_id"].to_pylist()


def test_a_finished_run_is_not_reused_when_the_content_changed(tmp_path):
    paths, raw = plain_inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert main(score_args(paths, out)) == 0
    assert selected(out) == list(dense_run(raw, "image", "surplus", 1, 7)[0])
    assert swap_same_size_same_mtime(paths["pool"], raw, np.random.default_rng(99))
    assert main(score_args(paths, out)) == 0
    assert selected(out) == list(dense_run(raw, "image", "surplus", 1, 7)[0])   # the fresh answer


RESUME = """
import json, sys
from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.score.job import LocalBackend, run_score
p = json.loads(sys.argv[2])
run_score(ScoreInputs(p["paired_images"], p["paired_texts"], p["pool"]), ScoreConfig(budget=7, shard_rows=14),
          sys.argv[1], lambda: LocalBackend("cpu"))
"""


def test_an_interrupted_run_does_not_mix_old_shards_with_new_content(tmp_path):
    paths, raw = plain_inputs(tmp_path / "in", 2)
    out, args = tmp_path / "out", json.dumps({k: str(v) for k, v in paths.items()})
    import faults

    script = faults.prelude(f"die_in_shard_in_process(1, {str(tmp_path / 'died')!r})") + RESUME
    died = subprocess.run([sys.executable, "-c", script, str(out), args], capture_output=True, text=True, timeout=120)
    assert died.returncode == 17 and (out / ".work" / "manifest.json").exists()   # shard 0 done, then killed
    assert swap_same_size_same_mtime(paths["pool"], raw, np.random.default_rng(5))
    again = subprocess.run([sys.executable, "-c", RESUME, str(out), args], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    want_ids, want_scores = dense_run(raw, "image", "surplus", 1, 7)
    assert selected(out) == list(want_ids)
    scores = pq.read_table(out / "scores.parquet")
    got = dict(zip(scores["image_id"].to_pylist(), scores["score"].to_pylist()))
    assert all(got[i] == pytest.approx(want_scores[i], abs=1e-9) for i in got)


def test_one_writer_per_out(tmp_path, capsys):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(3), n_pool=40)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)          # another run holds it
    os.write(fd, b"4242\n")
    try:
        assert main(score_args(paths, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another run (pid 4242) is writing this --out" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        os.close(fd)                        # released: the next run goes ahead
    assert main(score_args(paths, out)) == 0 and (out / "selection.parquet").exists()


def test_unusable_out_is_refused_before_any_work(tmp_path, capsys):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(4), n_pool=40)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert main(score_args(paths, a_file)) == 2
    assert "--out exists and is not a directory" in capsys.readouterr().err and a_file.read_text() == "x"
    pool_dir = tmp_path / "pooldir"
    pool_dir.mkdir()
    os.replace(paths["pool"], pool_dir / "part-0.parquet")
    paths["pool"] = pool_dir
    assert main(score_args(paths, pool_dir / "out")) == 2
    assert "--out is inside the pool directory" in capsys.readouterr().err
    assert not (pool_dir / "out").exists()


def test_bad_input_leaves_no_out_folder(tmp_path, capsys):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(5), n_pool=40)
    assert main(score_args(paths, tmp_path / "out", budget=41)) == 2
    assert "larger than the pool" in capsys.readouterr().err and not (tmp_path / "out").exists()


def corrupt_first_page(path):
    b = bytearray(path.read_bytes())
    footer = int.from_bytes(b[-8:-4], "little")
    for i in range(40, min(len(b) - footer - 8, 400)):
        b[i] ^= 0x5A
    path.write_bytes(bytes(b))


def test_corrupt_data_page_is_exit_2_naming_file_and_row_group(tmp_path, capsys):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(6), n_pool=40)
    corrupt_first_page(paths["pool"])
    assert main(score_args(paths, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{paths['pool']}: row group 0 of 6 cannot be read" in err[0]
    assert not (tmp_path / "out").exists()


def test_uint64_ids_only_while_they_fit_int64(tmp_path, capsys):
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(7), n_pool=40)
    t = pq.read_table(paths["pool"])
    ids = t["image_id"].to_numpy().astype(np.uint64)
    pq.write_table(t.set_column(0, "image_id", pa.array(ids, pa.uint64())), paths["pool"])
    assert main(score_args(paths, tmp_path / "ok")) == 0                   # small uint64 ids are fine
    assert selected(tmp_path / "ok") == list(dense_run(raw, "image", "surplus", 1, 7)[0])
    ids[3] = np.uint64(2**63 + 5)
    pq.write_table(t.set_column(0, "image_id", pa.array(ids, pa.uint64())), paths["pool"])
    assert main(score_args(paths, tmp_path / "big")) == 2
    assert f"column 'image_id' row 3: id {2**63 + 5} does not fit int64" in capsys.readouterr().err


@pytest.mark.parametrize("sets,message", [
    (["--set", "seeds=5"], "seeds must be a list of integers, got 5"),
    (["--set", "budget=abc"], "budget must be an integer, got 'abc'"),
    (["--set", "train.lr=fast"], "train.lr must be a number, got 'fast'"),
    (["--set", "nonsense=1"], "nonsense: unknown key"),
    (["--set", "strategies=[{name: r, strategy: random, k: x}]"], "strategies[0].k must be an integer"),
])
def test_loop_config_errors_name_the_key(tmp_path, capsys, sets, message):
    assert main(["loop", "jobs/smoke.yaml", "--out", str(tmp_path / "out"), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "out").exists()


def test_missing_loop_config(tmp_path, capsys):
    assert main(["loop", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "none.yaml: no such config file" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(8), n_pool=40)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("hnal_ray.cluster.dispatch.run_score", interrupted)
    assert main(score_args(paths, tmp_path / "out")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hnal score: interrupted; re-run the same command to resume"]


@pytest.mark.parametrize("strategy", ["random", "coreset"])
def test_baselines_without_paired_texts(tmp_path, strategy):
    """Random and core-set need no paired texts on the image side (core-set uses the paired images)."""
    paths, raw = write_inputs(tmp_path / "in", np.random.default_rng(9), n_pool=40)
    t = pq.read_table(paths["paired_texts"])
    pq.write_table(t.slice(0, 0), paths["paired_texts"])
    assert main(score_args(paths, tmp_path / "out", "--strategy", strategy)) == 0
    assert len(selected(tmp_path / "out")) == 7


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory):
    """A pool large enough that scoring takes a few seconds (for signals sent mid-run)."""
    from hnal_ray.data.synthetic import make_example

    return make_example(tmp_path_factory.mktemp("slow"), n_images=6000, n_pool=150_000, n_pool_texts=10, dim=64,
                        file_rows=25_000)


@pytest.mark.ray
@pytest.mark.full
@pytest.mark.parametrize("shards", [0, 1])
def test_sigterm_is_one_line_exit_143_and_resumes(tmp_path, slow_inputs, shards):
    """Issue 23 (10): SIGTERM mid-score (in process, or with an embedded Ray and an actor) is handled
    like Ctrl-C: one line naming the resume, exit 143, no stack dump; the same command then finishes
    with the selection of an undisturbed run."""
    import signal
    import time

    p = slow_inputs
    args = [sys.executable, "-m", "hnal_ray.cli", "score", "--paired-images", str(p["paired_images"]),
            "--paired-texts", str(p["paired_texts"]), "--pool", str(p["pool_images"]), "--budget", "50",
            "--shards", str(shards), "--shard-rows", "25000", "--stream-rows", "4096"]
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "cut")], stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # thresholds done: the pool is being scored (a few seconds); terminate
        lines.append(line)
        if "thresholds for" in line:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, "".join(lines) + rest
    last = [ln for ln in rest.strip().splitlines() if ln.strip()][-1]
    assert last == "hnal score: terminated (SIGTERM); re-run the same command to resume", rest[-2000:]
    assert "Stack trace" not in rest and "Traceback" not in rest and "*** SIG" not in rest, rest[-2000:]
    again = subprocess.run(args + ["--out", str(tmp_path / "cut")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    clean = subprocess.run(args[:args.index("--shards")] + ["--out", str(tmp_path / "clean")], capture_output=True,
                           text=True, timeout=600)
    assert clean.returncode == 0
    assert pq.read_table(tmp_path / "cut" / "selection.parquet").equals(
        pq.read_table(tmp_path / "clean" / "selection.parquet"))


def test_an_empty_manifest_or_summary_is_redone_not_a_traceback(tmp_path):
    """Issue 23 (10): an empty `.work/manifest.json` (a crash before its bytes reached the disk) or an
    empty `summary.json` makes the re-run redo the work, with the same outputs."""
    from hnal_ray.io import read_json

    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(8), n_pool=40)
    assert main(score_args(paths, tmp_path / "a")) == 0
    want = pq.read_table(tmp_path / "a" / "selection.parquet")
    (tmp_path / "a" / "summary.json").write_text("")
    assert read_json(tmp_path / "a" / "summary.json") is None
    assert main(score_args(paths, tmp_path / "a")) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["counts"]["selected"] == 7
    (tmp_path / "a" / ".work").mkdir()
    (tmp_path / "a" / ".work" / "manifest.json").write_text("")
    (tmp_path / "a" / "summary.json").write_text("{")
    assert main(score_args(paths, tmp_path / "a")) == 0
    assert pq.read_table(tmp_path / "a" / "selection.parquet").equals(want)


def test_a_killed_drivers_late_worker_cannot_touch_a_later_run(tmp_path, monkeypatch):
    """A worker of a killed driver finishing its shard while a new run (another config) is under way
    writes only a name that driver would have renamed: the new run's outputs are an undisturbed
    run's. (Ray ends such actors about a second after their driver; this is that second, made sure.)"""
    from hnal_ray.score import job
    from hnal_ray.score.worker import ScoreWorker

    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(8), n_pool=40)
    out, handed = tmp_path / "out", {}
    real_score, real_record = ScoreWorker.score, job._record

    def dies_in_shard_2(self, spec, task, anchors, thresholds, part_path):
        handed[spec.index] = part_path  # where the driver told this worker to write
        if spec.index == 2:
            raise KeyboardInterrupt  # the driver is gone mid-shard; its worker is not (yet)
        return real_score(self, spec, task, anchors, thresholds, part_path)

    monkeypatch.setattr(ScoreWorker, "score", dies_in_shard_2)
    assert main(score_args(paths, out, "--shard-rows", 7, "--k", 2)) == 130
    monkeypatch.setattr(ScoreWorker, "score", real_score)

    def orphan_writes_after_shard_2(work, manifest, res, *rest):
        real_record(work, manifest, res, *rest)
        if res.index == 2:  # the killed driver's worker finishes shard 2 now, with the old config's scores
            t = pq.read_table(os.path.join(work, "parts", "part-00002.parquet"))
            pq.write_table(t.set_column(1, "score", pa.array(np.full(t.num_rows, 99.0))), handed[2])

    monkeypatch.setattr(job, "_record", orphan_writes_after_shard_2)
    assert main(score_args(paths, out, "--shard-rows", 7)) == 0
    monkeypatch.setattr(job, "_record", real_record)
    assert main(score_args(paths, tmp_path / "clean", "--shard-rows", 7)) == 0
    for name in ("scores.parquet", "selection.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tmp_path / "clean" / name)), name
    assert not list((out / "scores.parquet").glob(".part-*"))


def test_disk_full_is_one_line_and_resumes(tmp_path, capsys, monkeypatch):
    """ENOSPC while a shard's part is written: one line naming the file, exit 2, and the same command
    later finishes with an undisturbed run's outputs (finished shards kept)."""
    import errno

    from hnal_ray.score import worker

    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(8), n_pool=40)
    real = worker.write_parquet

    def full_at_shard_3(table, path, *a, **k):
        if "part-00003" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(table, path, *a, **k)

    monkeypatch.setattr(worker, "write_parquet", full_at_shard_3)
    out = tmp_path / "out"
    assert main(score_args(paths, out, "--shard-rows", 7)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device writing" in err[0] and "part-00003" in err[0]
    monkeypatch.setattr(worker, "write_parquet", real)
    assert main(score_args(paths, out, "--shard-rows", 7)) == 0
    assert main(score_args(paths, tmp_path / "clean", "--shard-rows", 7)) == 0
    for name in ("scores.parquet", "selection.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tmp_path / "clean" / name)), name


def test_work_lost_past_every_retry_is_one_line(tmp_path, capsys, monkeypatch):
    from ray.exceptions import ActorDiedError

    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(8), n_pool=40)

    def lost(*a, **k):
        raise ActorDiedError()

    monkeypatch.setattr("hnal_ray.cluster.dispatch.run_score", lost)
    assert main(score_args(paths, tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the Ray cluster lost work it could not redo (ActorDiedError" in err[0]
