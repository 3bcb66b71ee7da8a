"""Selection: the pure kernels and the `hnal score` job that runs them over shards.

Owns the SPEC's math (per-text thresholds, Surplus/Counting scores, top-B, the random and
core-set baselines, the dense one-screen reference), the exact pruned and approximate modes, and
the job plumbing that needs no Ray: input checks and the shard plan, the shard worker, and the
driver that merges shard results and writes the outputs. May import only the shared modules
(`hnal_ray.io`, `config`, `device`); Ray actors around the worker live in `hnal_ray.cluster`.
"""
