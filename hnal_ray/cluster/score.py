"""The scoring job on Ray: one long-lived actor per shard, fanned out and gathered by the driver."""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import ray
from ray.exceptions import RayTaskError

from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.io import InputError
from hnal_ray.score.job import run_score
from hnal_ray.score.worker import Anchors, ScoreTask, ShardResult, ShardSpec, ShardWorker

from hnal_ray.cluster.session import ray_session

log = logging.getLogger(__name__)


@ray.remote(max_restarts=3, max_task_retries=3)
class ShardActor:
    """A thin shell around ShardWorker; a restarted actor reloads its shard from the files."""

    def __init__(self, spec: ShardSpec, device: str, threads: int):
        self.error = None
        try:
            self.worker = ShardWorker(spec, device, threads)
        except InputError as exc:  # reported by info(), so the driver gets the clean message
            self.error = exc

    def info(self) -> dict:
        if self.error is not None:
            raise self.error
        return self.worker.info() | {"node_id": ray.get_runtime_context().get_node_id()}

    def threshold_part(self, anchors: Anchors, k: int) -> np.ndarray:
        return self.worker.threshold_part(anchors, k)

    def score(self, task: ScoreTask, anchors: Anchors | None, thresholds: np.ndarray | None,
              part_path: str) -> ShardResult:
        res = self.worker.score(task, anchors, thresholds, part_path)
        return dataclasses.replace(res, node=ray.get_runtime_context().get_node_id())


def _get(refs):
    """ray.get that turns a worker's InputError back into the plain error."""
    try:
        return ray.get(refs)
    except RayTaskError as exc:
        if isinstance(exc.cause, InputError):
            raise exc.cause from None
        raise


def actor_resources(cfg: ScoreConfig, n_shards: int) -> dict:
    """A GPU per actor where the cluster has GPUs (or --device cuda asks for them, e.g. to make
    an autoscaler add GPU nodes); otherwise a fair share of the CPUs, fractional so that more
    shards than CPUs still all fit."""
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 1)
    if cfg.device == "cuda" or (cfg.device == "auto" and gpus >= 1):
        return {"num_gpus": 1 if gpus >= n_shards or gpus == 0 else gpus / n_shards, "num_cpus": 1}
    return {"num_cpus": min(max(1.0, cpus // n_shards), cpus / n_shards)}


class RayBackend:
    """Shard workers as Ray actors; large shared inputs are put in the object store once."""

    def __init__(self, specs: list[ShardSpec], cfg: ScoreConfig):
        opts = actor_resources(cfg, len(specs))
        threads = max(1, math.floor(opts["num_cpus"]))
        device = "cuda" if opts.get("num_gpus") else "cpu"
        self.actors = [ShardActor.options(**opts, scheduling_strategy="SPREAD").remote(s, device, threads)
                       for s in specs]
        self.infos = _get([a.info.remote() for a in self.actors])
        log.info("%d shard actors ready (%s each)", len(self.actors), opts)
        self._refs: dict[int, ray.ObjectRef] = {}

    def _put(self, x):
        """ray.put a shared input once, however many calls pass it."""
        if x is None:
            return None
        if id(x) not in self._refs:
            self._refs[id(x)] = (ray.put(x), x)
        return self._refs[id(x)][0]

    def threshold_parts(self, anchors: Anchors, k: int) -> list[np.ndarray]:
        ref = self._put(anchors)
        return _get([a.threshold_part.remote(ref, k) for a in self.actors])

    def score(self, shards, tasks, anchors, thresholds, part_paths):
        a_ref, t_ref = self._put(anchors), self._put(thresholds)
        pending = [self.actors[i].score.remote(task, a_ref, t_ref, path)
                   for i, task, path in zip(shards, tasks, part_paths)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield _get(done[0])

    def info(self) -> dict:
        return {"backend": "ray", "workers": self.infos}

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors, self._refs = [], {}


def run_score_on_ray(inputs: ScoreInputs, cfg: ScoreConfig, out_dir) -> dict:
    """`hnal score --shards N`: the same job, with N actors on a connected or embedded Ray."""
    with ray_session(cfg.address):
        return run_score(inputs, cfg, out_dir, lambda specs: RayBackend(specs, cfg))
