"""Run independent pieces of work as Ray tasks, a bounded number at once, results as they finish.

The loop hands in plain functions (it sits above this package; this package never imports it).
With `max_in_flight=0` the same functions run one by one in this process, which is what a
debugger wants and gives the same numbers.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Hashable

import ray
from hnal_ray.cluster.session import ray_get

log = logging.getLogger(__name__)


def task_resources(threads: int) -> tuple[float, float, int]:
    """(CPUs, GPUs) per task and how many fit on the cluster now: a GPU each where there are GPUs,
    else `threads` CPUs each."""
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 1)
    if gpus >= 1:
        return 1.0, 1.0, int(gpus)
    return float(threads), 0.0, max(1, int(cpus // threads))


class TaskPool:
    """submit() queues work under a key; wait() launches up to `max_in_flight` and returns
    [(key, result)] of the ones that finished. A task whose worker dies is retried by Ray; an
    exception in a task is raised here (InputError/ConfigError as themselves)."""

    def __init__(self, max_in_flight: int, num_cpus: float = 1.0, num_gpus: float = 0.0, max_retries: int = 2):
        self.max_in_flight = max_in_flight
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": max_retries}
        self.queue: collections.deque = collections.deque()
        self.running: dict[ray.ObjectRef, Hashable] = {}
        self._remote: dict[Callable, Any] = {}

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    def submit(self, key: Hashable, fn: Callable, *args) -> None:
        self.queue.append((key, fn, args))

    def wait(self) -> list[tuple[Hashable, Any]]:
        if self.max_in_flight == 0:
            key, fn, args = self.queue.popleft()
            return [(key, fn(*args))]
        while self.queue and len(self.running) < self.max_in_flight:
            key, fn, args = self.queue.popleft()
            self.running[self._as_remote(fn).remote(*args)] = key
        done, _ = ray.wait(list(self.running), num_returns=1)
        return [(self.running.pop(ref), ray_get(ref)) for ref in done]

    def cancel(self) -> None:
        """Forget the queued and running work. The running tasks are not force-cancelled: Ray ends a
        driver's tasks with the driver (its shutdown, or its process), and `ray.cancel(force=True)`
        racing a task that is finishing aborts Ray 2.60's core worker ("Tried to complete task that
        was not pending", exit 1 with a C++ stack dump in the user's terminal)."""
        self.running.clear()
        self.queue.clear()

    def _as_remote(self, fn: Callable):
        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn).options(**self.options)
        return self._remote[fn]

