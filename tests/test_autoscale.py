"""Autoscaling, tested here: Ray's fake multi-node provider with the node types of cluster.yaml (a head
with no CPUs, GPU and CPU workers from 0). A scoring job with queued shards makes the autoscaler add
workers, the actors start on them and take shards, and the cluster shrinks back to the head when idle.
The cluster is started with `ray start --block` in its own session and stopped by PID."""
import json
import os
import shutil
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
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def fake_cluster_config(port: int, max_per_type: int = 2, idle_minutes: float = 0.1) -> dict:
    """cluster.yaml's worker node types and resources (so the two cannot drift), at most
    `max_per_type` of each, on Ray's fake multi-node provider (nodes are local processes)."""
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = raw["available_node_types"][raw["head_node_type"]]
    types = {name: {"resources": dict(t["resources"]), "node_config": {}, "min_workers": t.get("min_workers", 0),
                    "max_workers": min(t.get("max_workers", max_per_type), max_per_type)}
             for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]}
    types["ray.head.default"] = {"resources": dict(head["resources"]), "node_config": {}, "max_workers": 0}
    # the fake provider's own defaults file is not shipped in the wheel: load it as an external module
    provider = {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                "disable_node_updaters": True, "disable_launch_config_check": True,
                "gcs_address": f"127.0.0.1:{port}"}
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")
    return {"cluster_name": "hnal-fake", "max_workers": max_per_type * len(types), "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_minutes, "provider": provider, "available_node_types": types,
            "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
            "file_mounts_sync_continuously": False, **{k: [] for k in empty}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_processes_of(temp_dir: str) -> None:
    """SIGKILL every process with the cluster's temp dir in its command line or open files (the fake
    nodes' raylets and workers outlive the head's process group)."""
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            mine = temp_dir in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode() or any(
                temp_dir in os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd"))
            if mine:
                os.kill(int(p), signal.SIGKILL)
        except OSError:
            continue


def _alive_workers(address: str, env: dict) -> list[dict]:
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print('NODES ' + json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))" % address)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # Ray may print autoscaler events to a driver's stdout too: take our line
    nodes = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("NODES "))[6:])
    return [n for n in nodes if "node:__internal_head__" not in n]


def test_scoring_job_scales_the_cluster_up_and_back_down(tmp_path):
    paths, _ = write_inputs(tmp_path / "in", np.random.default_rng(8), n_pool=60)
    assert main(["score", "--paired-images", str(paths["paired_images"]), "--paired-texts",
                 str(paths["paired_texts"]), "--pool", str(paths["pool"]), "--budget", "9",
                 "--out", str(tmp_path / "single")]) == 0
    port = _free_port()
    config = tmp_path / "fake_cluster.json"
    config.write_text(json.dumps(fake_cluster_config(port)))
    temp_dir = f"/tmp/hnal-as-{port}"  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
                             f"--autoscaling-config={config}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                             "--disable-usage-stats",
                             *(f"--{flag}={_free_port()}" for flag in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                 "metrics-export-port", "ray-client-server-port"))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        assert _alive_workers(address, env) == []  # only the head, which has no CPU: nothing can run yet
        out = tmp_path / "out"
        # two actors asking for a GPU each: the autoscaler must add cluster.yaml's `gpu` nodes
        r = subprocess.run([sys.executable, "-m", "hnal_ray.cli", "score", "--paired-images",
                            str(paths["paired_images"]), "--paired-texts", str(paths["paired_texts"]),
                            "--pool", str(paths["pool"]), "--budget", "9", "--shards", "2", "--shard-rows", "7",
                            "--device", "cuda", "--address", address, "--out", str(out)],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        for name in ("selection.parquet", "scores.parquet"):
            assert pq.read_table(out / name).sort_by("image_id").equals(
                pq.read_table(tmp_path / "single" / name).sort_by("image_id")), name
        summary = json.loads((out / "summary.json").read_text())
        gpu_nodes = {w["node_id"] for w in summary["workers"]}
        assert len(summary["workers"]) == 2 and len(summary["shards"]) == 9
        assert sum(w["shards"] for w in summary["workers"]) == 9  # the queue fed both actors
        log = (Path(temp_dir) / "session_latest" / "logs" / "monitor.log").read_text()
        assert "Adding" in log and "of type gpu" in log
        assert gpu_nodes and all(n for n in gpu_nodes)
        deadline = time.time() + 180
        while (alive := _alive_workers(address, env)) and time.time() < deadline:
            time.sleep(3)
        assert alive == [], f"workers still up after the idle timeout: {alive}"
        assert "Removing" in (Path(temp_dir) / "session_latest" / "logs" / "monitor.log").read_text()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        finally:
            _kill_processes_of(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
