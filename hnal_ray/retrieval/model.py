"""The retrieval model: trainable projection heads over frozen image and text features, and
optionally a trainable low-rank update of the image encoder's last stage."""
from __future__ import annotations


import torch
from torch import nn
import torch.nn.functional as F

from hnal_ray.config import ModelConfig  # declared with the other configs; importable from here too


def _head(d_in: int, cfg: ModelConfig) -> nn.Module:
    if cfg.hidden <= 0:
        return nn.Linear(d_in, cfg.embed_dim)
    return nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.embed_dim))


class ConvHeadLoRA(nn.Module):
    """EfficientNet-Lite0's last stage with a trainable rank-r update (LoRA) of its 1x1 conv.

    maps (b, P, C_in) -> unit (b, C_out) features:
        pre = maps @ (W^T + down @ up) * scale + shift      (conv_head, then BN folded to scale/shift)
        feature = normalize(mean over the P positions of ReLU6(pre))
    With `up` at zero (its initial value) this is exactly the frozen encoder's pooled feature, as
    the feature tables hold it (L2-normalised). W, scale and shift are frozen buffers (saved with the
    model); only `down` and `up` learn. The frozen part, maps @ W^T * scale + shift, can be computed
    once per image and passed in as `pre` (training does), leaving r * (C_in + C_out) multiply-adds
    per position for the update."""

    def __init__(self, rank: int, c_in: int = 320, c_out: int = 1280):
        super().__init__()
        self.register_buffer("weight", torch.zeros(c_out, c_in))
        self.register_buffer("scale", torch.ones(c_out))
        self.register_buffer("shift", torch.zeros(c_out))
        self.down = nn.Parameter(torch.randn(c_in, rank) / c_in ** 0.5)
        self.up = nn.Parameter(torch.zeros(rank, c_out))

    def load_frozen(self, stage: dict[str, torch.Tensor]) -> None:
        """The encoder's own weights (data.encoders.ImageEncoder.last_stage)."""
        for name in ("weight", "scale", "shift"):
            getattr(self, name).copy_(stage[name])

    @torch.no_grad()
    def frozen_pre(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.float() @ self.weight.T * self.scale + self.shift

    def forward(self, maps: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        b, p, c = maps.shape
        maps = maps.float()
        pre = self.frozen_pre(maps) if pre is None else pre.float()  # float(): a no-op on float32
        # one GEMM with accumulate: pre + (maps @ down) @ (up * scale), over all b * p positions
        out = torch.addmm(pre.reshape(b * p, -1), maps.reshape(b * p, c) @ self.down, self.up * self.scale)
        return F.normalize(out.clamp(0.0, 6.0).view(b, p, -1).mean(dim=1), dim=-1)  # ReLU6 (clamp: 3x faster on CPU)


class DualEncoder(nn.Module):
    """f(image) and g(text): (n, image_dim) / (n, text_dim) features -> (n, embed_dim) unit vectors.
    With `image_block_rank > 0` the image input is (maps, pre or None) instead (ConvHeadLoRA)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_block = ConvHeadLoRA(cfg.image_block_rank) if cfg.image_block_rank > 0 else None
        self.image_head = _head(cfg.image_dim, cfg)
        self.text_head = _head(cfg.text_dim, cfg)

    def embed_images(self, x) -> torch.Tensor:
        if self.image_block is not None:
            maps, pre = x if isinstance(x, tuple) else (x, None)
            x = self.image_block(maps, pre)
        return F.normalize(self.image_head(x), dim=-1)

    def embed_texts(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(x), dim=-1)

    def forward(self, image_feat, text_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_images(image_feat), self.embed_texts(text_feat)
