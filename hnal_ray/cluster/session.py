"""Connect to a Ray cluster, or start an embedded one and stop it at the end."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import ray
from ray.exceptions import RayTaskError

from hnal_ray.config import ConfigError
from hnal_ray.io import InputError

log = logging.getLogger(__name__)


def ray_get(refs):
    """ray.get that raises a task's or actor's InputError / ConfigError as itself (one line for the
    user), any other failure as Ray reports it."""
    try:
        return ray.get(refs)
    except RayTaskError as exc:
        if isinstance(exc.cause, (InputError, ConfigError)):
            raise exc.cause from None
        raise


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """`address`, else RAY_ADDRESS (set by `ray job submit`), else an embedded local Ray; a Ray
    already initialised in this process (tests, notebooks) is reused and left running."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    quiet = not log.isEnabledFor(logging.DEBUG)  # `hnal -v` shows Ray's own logs and every worker's
    level = logging.ERROR if quiet else logging.INFO
    embedded = {} if address else {"num_cpus": num_cpus, "include_dashboard": False}
    ray.init(address=address or "local", **embedded, logging_level=level, log_to_driver=not quiet)
    if quiet:
        _quiet_ray_data()
    where = f"connected to Ray at {address}" if address else "started an embedded Ray"
    log.info("%s: %s", where, ray.cluster_resources())
    if main and on_term is not None:  # ray.init installs its own SIGTERM handler: the caller's stays in charge
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        ray.shutdown()


def _quiet_ray_data() -> None:
    """No per-operator progress lines from Ray Data (the project prints one line per stage)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    for flag in ("enable_progress_bars", "enable_operator_progress_bars"):
        if hasattr(ctx, flag):
            setattr(ctx, flag, False)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
