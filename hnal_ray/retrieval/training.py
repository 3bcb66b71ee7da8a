"""The training loop's pure parts: pair batches, one epoch of VSE++ steps, evaluation, checkpoints."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from hnal_ray.config import ModelConfig, TrainConfig  # noqa: F401 (declared with the other configs; importable from here too)
from hnal_ray.data.features import FeatureSet
from hnal_ray.retrieval.loss import vse_loss
from hnal_ray.retrieval.metrics import recall_at_k
from hnal_ray.retrieval.model import DualEncoder


def epoch_batches(n_pairs: int, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  groups: np.ndarray | None = None) -> list[np.ndarray]:
    """This worker's batches of pair indices: one seeded shuffle per epoch, each global batch cut
    into `world` equal slices (the last, short batch is dropped so every worker steps together).

    With `groups` (one label per pair, `pair_groups`), the epoch's order keeps each group together:
    the groups in a seeded random order, each one's pairs shuffled, cut into global batches that are
    then visited in a seeded random order; so a batch holds look-alikes and the max-of-hinges loss
    meets the hard negatives that random batches of a larger set rarely put side by side."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n_pairs)
    per = max(batch_size // world, 1)
    n_batches = n_pairs // (per * world)
    if groups is None:
        return [perm[(b * world + rank) * per:(b * world + rank + 1) * per] for b in range(n_batches)]
    groups = np.asarray(groups)
    rank_of = np.empty(int(groups.max()) + 1 if len(groups) else 0, np.int64)
    rank_of[np.unique(groups)] = rng.permutation(len(np.unique(groups)))
    order = perm[np.argsort(rank_of[groups[perm]], kind="stable")]  # groups in random order, shuffled within
    visit = rng.permutation(n_batches)
    return [order[(b * world + rank) * per:(b * world + rank + 1) * per] for b in visit]


def pair_groups(data: FeatureSet, owner_row: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
    """(n_pairs,) k-means labels of each pair's image (frozen features, unit-normalised; seeded;
    about one cluster per batch), for `epoch_batches(..., groups=)`."""
    from hnal_ray.score.kmeans import cluster_labels
    feat = np.asarray(data.image_feat, np.float64)
    feat = (feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    k = max(1, len(owner_row) // max(batch_size, 1))
    return cluster_labels(feat, k, seed)[1][owner_row]


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, data: FeatureSet, owner_row: np.ndarray,
                batches: list[np.ndarray], cfg: TrainConfig, epoch: int, device: torch.device) -> float:
    """One pass; pair p = (image row owner_row[p], text row p). Returns the mean loss."""
    model.train()
    losses = []
    hardest = epoch >= cfg.warmup_epochs
    for idx in batches:
        img = image_input(data, owner_row[idx], device)
        txt = torch.from_numpy(data.text_feat[idx]).to(device)
        owner = torch.from_numpy(data.text_owner[idx]).to(device)
        a, b = model(img, txt)
        loss = vse_loss(a, b, owner, cfg.margin, max_violation=hardest)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else 0.0


def image_input(data: FeatureSet, rows: np.ndarray, device: torch.device):
    """The image side's model input for these rows: frozen pooled features, or (maps, frozen
    pre-activations or None) when the set carries the last stage's maps (ConvHeadLoRA)."""
    if data.image_maps is None:
        return torch.from_numpy(data.image_feat[rows]).to(device)
    pre = None if data.image_pre is None else torch.from_numpy(data.image_pre[rows]).to(device)
    return torch.from_numpy(np.asarray(data.image_maps[rows])).to(device), pre


@torch.no_grad()
def embed(model: DualEncoder, feat: np.ndarray, kind: str, device: torch.device, batch: int = 4096) -> np.ndarray:
    """(n, D) frozen features -> (n, embed_dim) float32 unit vectors from the model's `kind` head."""
    model.eval()
    fn = model.embed_images if kind == "image" else model.embed_texts
    out = [fn(torch.from_numpy(feat[i:i + batch]).to(device)).cpu().numpy() for i in range(0, len(feat), batch)]
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


@torch.no_grad()
def embed_images(model: DualEncoder, data: FeatureSet, device: torch.device, batch: int = 256) -> np.ndarray:
    """Every image of `data` -> (n, embed_dim) unit vectors, through the trained last stage when
    the model has one (then `data` must carry image_maps)."""
    if model.image_block is None:
        return embed(model, data.image_feat, "image", device)
    if data.image_maps is None:
        raise ValueError("this model trains the image encoder's last stage: load the features with image_maps=True")
    model.eval()
    out = [model.embed_images(image_input(data, np.arange(i, min(i + batch, len(data.image_ids))), device))
           .cpu().numpy() for i in range(0, len(data.image_ids), batch)]
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


def evaluate(model: DualEncoder, data: FeatureSet, device: torch.device) -> dict[str, float]:
    """Recall@1/5/10 both ways, rsum and r1_sum of `model` on a split."""
    return recall_at_k(embed_images(model, data, device), data.image_ids,
                       embed(model, data.text_feat, "text", device), data.text_owner)


def save_checkpoint(d: Path, model: DualEncoder, opt, epoch: int, best: dict, best_state: dict) -> None:
    """Latest state (for resuming) plus the best-so-far weights by validation rsum."""
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, d / "last.pt")
    torch.save(best_state, d / "best.pt")
    (d / "meta.json").write_text(json.dumps({"epoch": epoch, "best": best, "model": dataclasses.asdict(model.cfg)}))


def load_best(checkpoint_dir: str | Path) -> tuple[DualEncoder, dict]:
    """The best weights of a finished run and their metadata."""
    d = Path(checkpoint_dir)
    meta = json.loads((d / "meta.json").read_text())
    model = DualEncoder(ModelConfig(**meta["model"]))
    model.load_state_dict(torch.load(d / "best.pt", map_location="cpu"))
    return model.eval(), meta
