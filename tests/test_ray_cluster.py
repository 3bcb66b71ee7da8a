"""Ray beyond one in-process instance: two nodes, `ray job submit`, and the cluster-launcher file."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import write_inputs
from hnal_ray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.full]
ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]


def score_args(paths, out, *extra):
    return ["--paired-images", str(paths["paired_images"]), "--paired-texts", str(paths["paired_texts"]),
            "--pool", str(paths["pool"]), "--budget", "9", "--out", str(out), *map(str, extra)]


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"]["CPU"] == 0
    assert "--num-cpus=0" in " ".join(raw["head_start_ray_commands"])
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert gpu and all(t["min_workers"] == 0 for t in gpu)
    setup = " ".join(raw["setup_commands"])
    assert "[gpu]" in setup and "faiss-cpu" not in setup and "/mnt/shared" in setup


def test_two_nodes_spread_actors_and_match_single_process(tmp_path):
    from ray.cluster_utils import Cluster

    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(5), n_pool=50)
    assert main(["score", *score_args(paths, tmp_path / "single")]) == 0
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert main(["score", *score_args(paths, tmp_path / "two", "--shards", 2, "--shard-rows", 25)]) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert len({w["node_id"] for w in summary["backend"]["workers"]}) == 2
    for name in ("selection.parquet", "scores.parquet"):
        assert pq.read_table(tmp_path / "single" / name).sort_by("image_id").equals(
            pq.read_table(tmp_path / "two" / name).sort_by("image_id"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_to_a_started_head(tmp_path):
    """`ray start --head` (auth on), `ray job submit` of jobs/select.py, outputs checked; stopped by PID."""
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(6), n_pool=50)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--disable-usage-stats",
                             # the agents' default ports may be taken by another Ray on this machine
                             *(f"--{flag}={_free_port()}" for flag in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                 "metrics-export-port"))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert time.time() < deadline and head.poll() is None, "head did not come up"
            time.sleep(2)
        out = tmp_path / "out"
        agent_deadline = time.time() + 180
        while True:  # the job agent can come up well after the dashboard answers: Ray says to try again later
            r = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir",
                                str(REPO), "--", "python", "jobs/select.py", *score_args(paths, out, "--shards", 2)],
                               env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in r.stdout + r.stderr or time.time() > agent_deadline:
                break
            time.sleep(3)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout + r.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["backend"]["backend"] == "ray" and summary["counts"]["selected"] == 9
        assert pq.read_table(out / "selection.parquet").num_rows == 9
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` takes its Ray processes down with it
        head.wait(timeout=60)
