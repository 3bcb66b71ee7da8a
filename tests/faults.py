"""Faults injected from tests only (issue 22: no test switches in library code). In this process a
monkeypatch; in Ray actors a ScoreWorker subclass handed to `RayBackend(worker_cls=...)`, in Ray
Train workers a loop handed to `fit(loop=...)` (both pickled by value, so workers need not import
this module); in a subprocess, a prelude that installs the
fault before the command runs."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from hnal_ray.score.worker import ScoreWorker


def dies_once_in_shard(shard: int, marker: str | Path) -> type:
    """A ScoreWorker whose process dies (exit 17) the first time it is handed `shard`, leaving its pid
    in `marker`; once the marker exists it scores normally."""
    marker = str(marker)

    class DiesOnce(ScoreWorker):
        score = _dying_score(ScoreWorker.score, shard, marker)

    return DiesOnce


def _dying_score(score, shard: int, marker: str):
    def dying(self, spec, task, anchors, thresholds, part_path):
        if spec.index == shard and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(17)
        return score(self, spec, task, anchors, thresholds, part_path)

    return dying


def dies_once_at_epoch(epoch: int, marker: str | Path):
    """A Ray Train loop (hnal_ray.cluster.train.train_func) whose last worker dies (exit 1) once, when
    it is about to report `epoch`, leaving `marker`; pass it as `fit(..., loop=...)`."""
    marker = str(marker)

    def loop(config: dict) -> None:
        import ray.train

        from hnal_ray.cluster import train

        report = ray.train.report

        def report_or_die(metrics, checkpoint=None):
            ctx = ray.train.get_context()
            if metrics["epoch"] == epoch and ctx.get_world_rank() == ctx.get_world_size() - 1 \
                    and not os.path.exists(marker):
                Path(marker).touch()
                os._exit(1)
            return report(metrics, checkpoint=checkpoint)

        ray.train.report = report_or_die  # in this worker process only
        train.train_func(config)

    return loop


def die_in_shard_in_process(shard: int, marker: str | Path) -> None:
    """The same fault for the in-process backend (this process's ScoreWorker)."""
    ScoreWorker.score = _dying_score(ScoreWorker.score, shard, str(marker))


def kill_after_rounds(n: int) -> None:
    """SIGKILL to this process group (driver and its embedded Ray, like `kill -9`) once the loop has
    finished `n` rounds in this run."""
    from hnal_ray.loop import driver

    finished = driver.Progress.finished

    def then_die(self, state):
        finished(self, state)
        if self.fresh == n:
            os.killpg(os.getpgrp(), signal.SIGKILL)

    driver.Progress.finished = then_die


PRELUDE = "import sys; sys.path.insert(0, {tests!r}); import faults; faults.{call}\n"


def prelude(call: str) -> str:
    """Python source that installs a fault (e.g. `die_in_shard_in_process(2, '/tmp/m')`) in a subprocess."""
    return PRELUDE.format(tests=str(Path(__file__).resolve().parent), call=call)
