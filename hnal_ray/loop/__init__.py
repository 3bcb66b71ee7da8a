"""The active-learning loop: its config (one YAML per run), the round driver
(train -> evaluate -> embed -> score and select -> annotate -> add), annotators, and the report.

The top of the library: it may import `hnal_ray.cluster` and every pure stage below it; only
`hnal_ray.cli`, `hnal_ray.api`, `hnal_ray.bench` and `jobs/` import it.
"""
