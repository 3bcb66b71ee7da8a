"""The one way a scoring job runs (`hnal score`, `hnal_ray.select`, the loop's rounds); Ray is imported
only when the job asks for actors, so an in-process job never pays for it."""
from __future__ import annotations

from hnal_ray.config import ScoreConfig, ScoreInputs
from hnal_ray.score.job import finished_summary, run_score


def run_score_job(inputs: ScoreInputs, cfg: ScoreConfig, out_dir) -> dict:
    """A finished run is found before Ray starts; `shards` 0 runs in this process, N on at most N
    Ray actors (`cluster.actors`)."""
    done = finished_summary(inputs, cfg, out_dir)
    if done is not None:
        return done
    if cfg.shards == 0:
        return run_score(inputs, cfg, out_dir)
    from hnal_ray.cluster.actors import run_score_on_ray

    return run_score_on_ray(inputs, cfg, out_dir)
