"""A lost node (issue 23): a real three-node Ray cluster on this machine (a head and two worker nodes,
`ray.cluster_utils.Cluster`), a worker node's raylet killed in the middle of `hnal score --shards`,
of the pool-scale k-means fit and of a loop round; the job finishes with the bytes of an
undisturbed run."""
import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.score.job import LocalBackend, run_score

pytestmark = [pytest.mark.ray, pytest.mark.full]
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from hnal_ray.data.synthetic import make_example

    p = make_example(tmp_path_factory.mktemp("nodeloss"), n_images=2000, n_pool=60_000, n_pool_texts=10, dim=32,
                     file_rows=5_000)
    return ScoreInputs(str(p["paired_images"]), str(p["paired_texts"]), str(p["pool_images"]))


def kill_when(cluster, node, ready, killed, timeout=120):
    """Remove `node` (its raylet and every worker on it) as soon as `ready()` holds."""
    def run():
        end = time.time() + timeout
        while time.time() < end and not ready():
            time.sleep(0.02)
        killed.append(time.time())  # when the kill started: the job must still be running then
        cluster.remove_node(node, allow_graceful=False)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("when", ["scoring", "kmeans-fit"])
def test_a_lost_worker_node_gives_the_same_bytes(tmp_path, cluster, inputs, when):
    from hnal_ray.cluster.actors import RayBackend

    c, workers = cluster
    kw = dict(budget=40, shards=2, shard_rows=1_500, stream_rows=500, seed=1)
    if when == "kmeans-fit":
        kw |= dict(strategy="cluster", quota="uncovered", within="typical", clusters=60, fit_iters=3)
    cfg = ScoreConfig(**kw)
    want = run_score(inputs, cfg, tmp_path / "undisturbed", lambda: LocalBackend("cpu"))
    out = tmp_path / "out"
    manifest, step = out / ".work" / "manifest.json", out / ".work" / "kmeans" / "step-001.npy"

    def ready():
        if when == "kmeans-fit":
            return step.exists()  # the first Lloyd step reduced: the second is on the actors
        try:
            return len(json.loads(manifest.read_text())["shards"]) >= 4  # of 48
        except (OSError, ValueError, KeyError):
            return False

    backend = RayBackend(2, cfg)
    hosts = {a["node_id"] for a in ray.get([actor.info.remote() for actor in backend.actors])}
    node = next(w for w in workers if w.node_id in hosts and w in c.worker_nodes)  # a node running an actor
    killed = []
    killer = kill_when(c, node, ready, killed)
    got = run_score(inputs, cfg, out, lambda: backend)
    finished = time.time()
    killer.join()
    assert killed and killed[0] < finished, "the node was removed after the job had finished"
    end = time.time() + 60
    while sum(n["Alive"] for n in ray.nodes()) != 2 and time.time() < end:
        time.sleep(0.5)
    assert sum(n["Alive"] for n in ray.nodes()) == 2, "the node was not removed"
    for name in ("selection.parquet", "scores.parquet"):
        a = pq.read_table(out / name).to_pandas()
        b = pq.read_table(tmp_path / "undisturbed" / name).to_pandas()
        assert a.equals(b), name
    assert got["counts"] == want["counts"]
    if when == "kmeans-fit":
        assert np.array_equal(np.load(out / "centres.npy"), np.load(tmp_path / "undisturbed" / "centres.npy"))
    workers.remove(node)
    workers.append(c.add_node(num_cpus=1))  # the next case starts from three nodes again
    c.wait_for_nodes()


def test_a_lost_worker_node_mid_round_gives_the_same_loop_numbers(tmp_path, cluster):
    """The smoke loop with rounds as Ray tasks (2 at once) over the three nodes; the node running a
    round is removed while that round trains; Ray runs the round's task again on a live node (a
    round starts from its inputs and writes its state last), and the loop's metrics are those of
    the same loop run in one process."""
    import dataclasses

    from ray.util.state import list_tasks

    from hnal_ray.loop.config import load_loop_config
    from hnal_ray.loop.driver import run_loop

    c, workers = cluster
    cfg = load_loop_config("jobs/smoke.yaml", [f"data={tmp_path / 'data'}", f"features={tmp_path / 'features'}",
                                                "concurrency=2", "train.epochs=6"])
    run_loop(dataclasses.replace(cfg, concurrency=0), tmp_path / "undisturbed")  # builds data and features too
    out, killed = tmp_path / "out", []
    by_id = {w.node_id: w for w in workers}

    def round_on_a_worker_node():
        if not list(out.glob("*/seed-*/round-1")):  # round 0 is done: round 1 is being computed
            return None
        running = list_tasks(filters=[("state", "=", "RUNNING"), ("func_or_class_name", "=", "run_round")])
        return next((by_id[t.node_id] for t in running if t.node_id in by_id), None)

    def kill():
        end = time.time() + 300
        while time.time() < end:
            node = round_on_a_worker_node()
            if node is not None:
                killed.append((time.time(), node))
                c.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    run_loop(cfg, out)
    finished = time.time()
    killer.join()
    assert killed and killed[0][0] < finished, "no round ran on a worker node, or it was removed after the loop"
    assert pq.read_table(out / "metrics.parquet").equals(pq.read_table(tmp_path / "undisturbed" / "metrics.parquet"))
    workers.remove(killed[0][1])
    workers.append(c.add_node(num_cpus=1))
    c.wait_for_nodes()
