"""The scoring job on Ray: N long-lived actors pull bounded shards from the driver's queue."""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import ray
from ray.exceptions import (ActorDiedError, NodeDiedError, ObjectLostError, RayActorError,
                            WorkerCrashedError)

from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.io import InputError, row_group_starts
from hnal_ray.score.job import run_score
from hnal_ray.score.plan import cut_rows, side_tables
from hnal_ray.score.worker import Anchors, ScoreTask, ScoreWorker, ShardResult, ShardSpec

from hnal_ray.cluster.session import ray_get, ray_session

log = logging.getLogger(__name__)
LOST_CALL_ATTEMPTS = 8


@ray.remote(max_restarts=3, max_task_retries=3)
class ScoreActor:
    """A thin shell around ScoreWorker: takes one shard per call; a restarted actor is handed the
    shard it died on again (max_task_retries), so only that shard is redone."""

    def __init__(self, device: str, threads: int, worker_cls: type = ScoreWorker):
        self.worker = worker_cls(device, threads)

    def info(self) -> dict:
        return self.worker.info() | {"node_id": ray.get_runtime_context().get_node_id()}

    def run(self, method: str, *args):
        return getattr(self.worker, method)(*args)

    def threshold_part(self, spec: ShardSpec, anchors: Anchors, k: int, stream_rows: int) -> np.ndarray:
        return self.worker.threshold_part(spec, anchors, k, stream_rows)

    def score(self, spec: ShardSpec, task: ScoreTask, anchors: Anchors | None, thresholds: np.ndarray | None,
              part_path: str) -> ShardResult:
        res = self.worker.score(spec, task, anchors, thresholds, part_path)
        return dataclasses.replace(res, node=ray.get_runtime_context().get_node_id())


def actor_resources(cfg: ScoreConfig, n_shards: int) -> dict:
    """A GPU per actor where the cluster has GPUs (or --device cuda asks for them, e.g. to make
    an autoscaler add GPU nodes); otherwise a fair share of the CPUs, fractional so that more
    shards than CPUs still all fit."""
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 1)
    if cfg.device == "cuda" or (cfg.device == "auto" and gpus >= 1):
        return {"num_gpus": 1 if gpus >= n_shards or gpus == 0 else gpus / n_shards, "num_cpus": 1}
    # never more than one node has: an actor asking for the whole cluster's CPUs would wait forever
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=cpus) or cpus
    return {"num_cpus": min(max(1.0, cpus // n_shards), cpus / n_shards, node_cpus)}


class RayBackend:
    """N actors and a queue of shards: each actor is handed the next shard when it finishes one, so a
    slow actor takes fewer, an actor that arrives late (autoscaling) takes its share, and the
    driver holds no pool rows. Large shared inputs are put in the object store once."""

    def __init__(self, n_actors: int, cfg: ScoreConfig, worker_cls: type = ScoreWorker):
        """`worker_cls`: the ScoreWorker each actor wraps (tests hand in one that fails on cue)."""
        opts = actor_resources(cfg, n_actors)
        threads = max(1, math.floor(opts["num_cpus"]))
        # an actor given a GPU uses it when CUDA sees one (a fake GPU of a test cluster: the CPU)
        device = "auto" if opts.get("num_gpus") else "cpu"
        self._new_actor = lambda: ScoreActor.options(**opts, scheduling_strategy="SPREAD").remote(device, threads,
                                                                                                   worker_cls)
        self.actors = [self._new_actor() for _ in range(n_actors)]
        log.info("%d score actors requested (%s each)", n_actors, opts)
        self._refs: dict[int, tuple] = {}

    def _put(self, x):
        """ray.put a shared input once, however many calls pass it."""
        if x is None:
            return None
        if id(x) not in self._refs:
            self._refs[id(x)] = (ray.put(x), x)
        return self._refs[id(x)][0]

    def _queue(self, method: str, calls: list[tuple]):
        """Run `method(*args)` for each args tuple on whichever actor is free; yield results as they
        finish. A call lost with its actor (a node gone, a process killed past Ray's own retries) is
        queued again, up to LOST_CALL_ATTEMPTS times, on an actor that is alive: an actor Ray gave up
        on is replaced. Every call writes its outputs atomically, so running one again is safe.
        Not ray.util.ActorPool: in Ray 2.60 its get_next_unordered re-raises a lost call's error
        without saying which call it was, so the call cannot be queued again, and a dead actor is
        dropped, not replaced."""
        queue = [(args, 0) for args in calls]
        free, pending = list(range(len(self.actors))), {}
        while queue or pending:
            while queue and free:
                slot = free.pop(0)
                args, tries = queue.pop(0)
                pending[getattr(self.actors[slot], method).remote(*args)] = (slot, args, tries)
            done, _ = ray.wait(list(pending), num_returns=1)
            slot, args, tries = pending.pop(done[0])
            try:
                result = ray_get(done[0])
            except (RayActorError, NodeDiedError, WorkerCrashedError, ObjectLostError) as exc:
                if tries + 1 >= LOST_CALL_ATTEMPTS:
                    raise
                log.warning("%s on actor %d was lost (%s); running it again", method, slot, type(exc).__name__)
                if isinstance(exc, ActorDiedError):  # past its restarts: a new actor, placed on a live node
                    self.actors[slot] = self._new_actor()
                time.sleep(min(0.5 * 2 ** tries, 10.0))  # a restarting actor needs a moment
                queue.insert(0, (args, tries + 1))
                free.append(slot)
                continue
            free.append(slot)
            yield result

    def run(self, method, calls):
        """Large arguments (centres, arrays) are put in the object store once, shared by every call."""
        big = [tuple(self._put(a) if isinstance(a, np.ndarray) and a.nbytes > 1 << 16 else a for a in args)
               for args in calls]
        yield from self._queue("run", [(method, *args) for args in big])

    def threshold_parts(self, shards, anchors, k, stream_rows):
        ref = self._put(anchors)
        return list(self._queue("threshold_part", [(s, ref, k, stream_rows) for s in shards]))

    def score(self, shards, tasks, anchors, thresholds, part_paths):
        a_ref, t_ref = self._put(anchors), self._put(thresholds)
        tasks = [self._put(t) for t in tasks]  # one task object (with its centres) is put once, not per shard
        yield from self._queue("score", [(s, task, a_ref, t_ref, path)
                                         for s, task, path in zip(shards, tasks, part_paths)])

    def info(self) -> dict:
        return {"backend": "ray", "workers": [self._info(a) for a in self.actors]}

    @staticmethod
    def _info(actor) -> dict:
        """An actor's counters; one that is restarting (its node lost) is waited for a little, then
        reported as lost rather than failing a finished job."""
        for attempt in range(LOST_CALL_ATTEMPTS):
            try:
                return ray.get(actor.info.remote(), timeout=60)
            except (RayActorError, NodeDiedError, WorkerCrashedError, ray.exceptions.GetTimeoutError):
                time.sleep(min(0.5 * 2 ** attempt, 10.0))
        return {"lost": True, "rows": 0, "shards": 0, "peak_rss_mib": float("nan")}

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors, self._refs = [], {}


def actor_count(inputs: ScoreInputs, cfg: ScoreConfig) -> int:
    """--shards N, but never more actors than there are shards of work (pool or paired keys): an
    idle actor costs a process and its memory (~250 MiB) for nothing."""
    tables = side_tables(inputs, cfg.side)
    try:
        work = max(len(cut_rows(row_group_starts(path), cfg.shard_rows)) for path in (tables.pool_path, tables.key_path))
    except (InputError, OSError, ValueError):  # unreadable input: the job's own checks name it
        return cfg.shards
    return max(1, min(cfg.shards, work))


def run_score_on_ray(inputs: ScoreInputs, cfg: ScoreConfig, out_dir) -> dict:
    """`hnal score --shards N`: the same job, with at most N actors on a connected or embedded Ray."""
    n = actor_count(inputs, cfg)
    if n < cfg.shards:
        log.info("--shards %d: %d actors, one per shard of work", cfg.shards, n)
    with ray_session(cfg.address):
        return run_score(inputs, cfg, out_dir, lambda: RayBackend(n, cfg))
