"""The retrieval model: a dual encoder over frozen features, its VSE++ loss, the training loop's
pure parts (batches, one epoch, checkpoints), Recall@K, and embedding a feature set with a model.

May import the shared modules and `hnal_ray.data` (feature tables); distributed training on Ray
Train lives in `hnal_ray.cluster.train`.
"""
