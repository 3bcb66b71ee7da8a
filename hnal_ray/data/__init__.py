"""Data: image-text sets and what is computed from them before any model is trained.

Owns the data sets (the emoji set built offline from PyPI packages, seeded synthetic tables), the
train/val/test split, the frozen encoders and the feature tables they produce (`FeatureSet`).
May import only the shared modules; the Ray Data feature job lives in `hnal_ray.cluster.features`.
"""
