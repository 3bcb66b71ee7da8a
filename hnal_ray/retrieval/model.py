"""The retrieval model: trainable projection heads over frozen image and text features."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    image_dim: int = 1280   # EfficientNet-Lite0 pooled features
    text_dim: int = 384     # all-MiniLM-L6-v2 sentence embeddings
    embed_dim: int = 256
    hidden: int = 512       # 0: a single linear layer per side


def _head(d_in: int, cfg: ModelConfig) -> nn.Module:
    if cfg.hidden <= 0:
        return nn.Linear(d_in, cfg.embed_dim)
    return nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.embed_dim))


class DualEncoder(nn.Module):
    """f(image) and g(text): (n, image_dim) / (n, text_dim) features -> (n, embed_dim) unit vectors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_head = _head(cfg.image_dim, cfg)
        self.text_head = _head(cfg.text_dim, cfg)

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(x), dim=-1)

    def embed_texts(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(x), dim=-1)

    def forward(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_images(image_feat), self.embed_texts(text_feat)
