"""Shared fixtures: one real local Ray per test module that asks for it."""
import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray (never a stray cluster on the machine) with 2 CPUs, stopped after the module."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
