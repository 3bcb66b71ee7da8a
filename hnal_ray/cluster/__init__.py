"""Everything that touches Ray lives in this subpackage: the session (connect or embed), the
scoring actors, the Ray Data feature job, Ray Train fits and the benchmark's Ray rows.

Actors and tasks are thin shells around the pure stages (`score`, `retrieval`, `data`), which it
may import with the shared modules; it never imports `loop`, `bench` or the CLI.
"""
