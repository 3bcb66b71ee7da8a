"""hnal_ray: hard-negative active learning for image-text retrieval, sharded on Ray."""

__version__ = "0.1.0"
