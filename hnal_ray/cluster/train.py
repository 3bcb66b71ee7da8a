"""Training the dual encoder on Ray Train: TorchTrainer with DDP workers (gloo on CPU, nccl on GPU),
or Train V2's local mode (`num_workers=0`: the same train_func in the calling process, no worker
start-up), which small fits on frozen features use by default."""
from __future__ import annotations

import copy
import json
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hnal_ray.data.features import load_features
from hnal_ray.data.image_maps import load_last_stage
from hnal_ray.device import pick_device
from hnal_ray.retrieval.model import DualEncoder
from hnal_ray.retrieval.training import (TrainConfig, epoch_batches, evaluate, pair_groups, save_checkpoint,
                                        train_epoch)

log = logging.getLogger(__name__)


def train_func(config: dict) -> None:
    """Runs on every Train worker (or in the caller, in local mode): load features, resume from the
    latest checkpoint, train, report."""
    cfg = TrainConfig.from_dict(config["train"])
    torch.set_num_threads(cfg.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    block = cfg.model.image_block_rank > 0
    data = load_features(config["features"], tuple(config.get("extra_texts", ())), image_maps=block)
    train = data.pairs(np.asarray(config["train_text_ids"], np.int64))
    val = data.subset(np.asarray(config["val_image_ids"], np.int64))
    owner_row = np.searchsorted(train.image_ids, train.text_owner)
    local_dir = config.get("local_checkpoint_dir")  # local mode: Train persists nothing itself
    device = pick_device("cuda" if config.get("use_gpu") else "cpu") if local_dir else ray.train.torch.get_device()
    model = DualEncoder(cfg.model).to(device) if local_dir else ray.train.torch.prepare_model(DualEncoder(cfg.model))
    inner = model.module if hasattr(model, "module") else model
    if block:  # the encoder's frozen last stage, then its pre-activations once per image
        inner.image_block.load_frozen(load_last_stage(config["features"]))
        train, val = train.with_image_pre(inner.image_block), val.with_image_pre(inner.image_block)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, best, best_state = 0, {"rsum": -1.0}, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and local_dir and (Path(local_dir) / "meta.json").exists():
        checkpoint = ray.train.Checkpoint.from_directory(local_dir)
    if checkpoint is None and config.get("init_checkpoint"):  # fine-tune: start from these weights
        inner.load_state_dict(torch.load(Path(config["init_checkpoint"]) / "best.pt", map_location=device))
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "last.pt", map_location=device)
            inner.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            best_state = torch.load(Path(d) / "best.pt", map_location="cpu")
            meta = json.loads((Path(d) / "meta.json").read_text())
            start, best = meta["epoch"] + 1, meta["best"]
    groups = pair_groups(train, owner_row, cfg.batch_size, cfg.seed) if cfg.batching == "clustered" else None
    for epoch in range(start, cfg.epochs):
        batches = epoch_batches(len(train.text_ids), cfg.batch_size, cfg.seed, epoch, rank, world, groups)
        loss = train_epoch(model, opt, train, owner_row, batches, cfg, epoch, device)
        metrics = evaluate(inner, val, device) | {"epoch": epoch, "loss": loss, "resumed_at": start}
        if cfg.model_choice == "average":
            if epoch >= cfg.epochs - cfg.average_epochs:
                best, best_state = average_in(inner, val, device, cfg, best, best_state, epoch)
        elif metrics["rsum"] > best["rsum"]:
            best, best_state = dict(metrics), copy.deepcopy({k: v.cpu() for k, v in inner.state_dict().items()})
        due = (epoch + 1) % cfg.checkpoint_every == 0 or epoch == cfg.epochs - 1
        if local_dir:
            ckpt = _save_local(Path(local_dir), inner, opt, epoch, best, best_state) if due else None
            ray.train.report(metrics | {"best_rsum": best["rsum"]}, checkpoint=ckpt)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and due:
                save_checkpoint(Path(tmp), inner, opt, epoch, best, best_state)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics | {"best_rsum": best["rsum"]}, checkpoint=ckpt)


def average_in(model: DualEncoder, val, device, cfg: TrainConfig, best: dict, avg: dict | None, epoch: int):
    """Fold this epoch's weights into the running uniform average of the last epochs; the average
    (not any single epoch) is the model kept, with its own validation metrics."""
    n = int(best.get("avg_count", 0))
    cur = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    learned = {k for k, _ in model.named_parameters()}  # frozen buffers are copied, never averaged
    avg = cur if n == 0 or avg is None else {k: avg[k] * (n / (n + 1)) + cur[k] / (n + 1) if k in learned else cur[k]
                                             for k in cur}
    averaged = DualEncoder(cfg.model).to(device)
    averaged.load_state_dict(avg)
    return evaluate(averaged, val, device) | {"epoch": epoch, "avg_count": n + 1}, avg


def _save_local(d: Path, model, opt, epoch: int, best: dict, best_state: dict) -> ray.train.Checkpoint:
    """Local mode's checkpoint, written beside `d` and renamed over it: a killed fit resumes from it."""
    tmp = d.with_name(f".{d.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint(tmp, model, opt, epoch, best, best_state)
    old = d.with_name(f".{d.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if d.exists():
        os.replace(d, old)
    os.replace(tmp, d)
    shutil.rmtree(old, ignore_errors=True)
    return ray.train.Checkpoint.from_directory(str(d))


@dataclasses.dataclass(frozen=True)
class FitResult:
    checkpoint: str      # directory with best.pt, last.pt, meta.json
    best: dict           # validation metrics of the best epoch
    last: dict           # metrics of the last reported epoch


def resolve_workers(cfg: TrainConfig) -> int:
    """`auto`: local mode where this process already holds a GPU (a trajectory task) or the cluster
    has none; otherwise one DDP worker per GPU of the cluster."""
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    if ray.is_initialized() and ray.get_gpu_ids():
        return 0
    gpus = ray.cluster_resources().get("GPU", 0)
    return int(gpus) if gpus >= 1 else 0


def fit(features_dir: str, train_text_ids, val_image_ids, cfg: TrainConfig, storage_path: str, name: str,
        init_checkpoint: str | None = None, extra_texts: tuple[str, ...] = (),
        loop: Callable[[dict], None] = train_func) -> FitResult:
    """Train on the pairs (text, its image) of `train_text_ids`, validate on the images
    `val_image_ids` with all their texts; a rerun with the same (storage_path, name) resumes.
    `init_checkpoint`: start from that checkpoint's best weights (fine-tuning) instead of at random.
    `loop`: the function each worker runs (tests hand in one that fails on cue)."""
    workers = resolve_workers(cfg)
    if workers == 0:
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else torch.cuda.is_available()
    else:
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    config = {"train": dataclasses.asdict(cfg), "features": str(Path(features_dir).resolve()), "use_gpu": use_gpu,
              "train_text_ids": [int(i) for i in train_text_ids], "val_image_ids": [int(i) for i in val_image_ids]}
    run_dir = Path(storage_path).resolve() / name
    if extra_texts:  # caption features added by annotation during a run
        config["extra_texts"] = [str(Path(p).resolve()) for p in extra_texts]
    if init_checkpoint:
        config["init_checkpoint"] = str(Path(init_checkpoint).resolve())
    if workers == 0:
        config["local_checkpoint_dir"] = str(run_dir / "checkpoint")
    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu and workers > 0,
                                     resources_per_worker={"CPU": 1} if workers else None),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=name,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / "meta.json").read_text())
    log.info("trained %s (%s): best epoch %d rsum %.1f", name, f"{workers} workers" if workers else "local mode",
             meta["best"].get("epoch", -1), meta["best"]["rsum"])
    return FitResult(result.checkpoint.path, meta["best"], dict(result.metrics))
