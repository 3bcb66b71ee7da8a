"""hnal_ray: hard-negative active learning for image-text retrieval, sharded on Ray.

The public API (see README, "Python API"): `select`, `run_loop`, `load_features`, and the
`Selection`, `FeatureSet`, `InputError`, `ConfigError` types. Everything else is internal.
Names are loaded on first use, so `import hnal_ray` stays cheap and pulls in neither torch nor Ray.
"""

__version__ = "0.1.0"
__all__ = ["select", "run_loop", "load_features", "Selection", "FeatureSet", "InputError", "ConfigError"]

_HOME = {"select": "hnal_ray.api", "run_loop": "hnal_ray.api", "load_features": "hnal_ray.api",
         "Selection": "hnal_ray.api", "FeatureSet": "hnal_ray.api", "InputError": "hnal_ray.io",
         "ConfigError": "hnal_ray.config"}


def __getattr__(name: str):
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'hnal_ray' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
