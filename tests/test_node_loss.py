"""A lost node (issue 23): a real three-node Ray cluster on this machine (a head and two worker nodes,
`ray.cluster_utils.Cluster`), a worker node's raylet killed in the middle of `hnal score --shards`
and of the pool-scale k-means fit; the job finishes with the bytes of an undisturbed run."""
import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.score.job import LocalBackend, run_score

pytestmark = pytest.mark.ray
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
    from hnal_ray.cluster.score import RayBackend

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
