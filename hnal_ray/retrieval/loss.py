"""VSE++ triplet ranking loss over both directions (Faghri et al. 2018), margin 0.2."""
from __future__ import annotations

import torch


def vse_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor, margin: float = 0.2,
             max_violation: bool = True) -> torch.Tensor:
    """Hinge loss of a batch of (image, caption) pairs; row i of both is a positive pair.

    image_emb, text_emb: (b, d) L2-normalised; owner: (b,) int64 image id of pair i, so two
    captions of one image in a batch are not each other's negatives. max_violation=True keeps
    only the hardest negative per query (VSE++), False sums all hinges (the warm-up VSE++ uses
    on small data). Returns the mean over the batch of the i2t plus t2i terms.
    """
    scores = image_emb @ text_emb.T                      # (b images, b texts)
    positive = scores.diagonal()
    same = owner[:, None] == owner[None, :]              # positives and same-image pairs: no negatives
    cost_t = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(same, 0)  # image -> wrong text
    cost_i = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(same, 0)  # text -> wrong image
    if max_violation:
        return (cost_t.max(dim=1).values + cost_i.max(dim=0).values).mean()
    return (cost_t.sum(dim=1) + cost_i.sum(dim=0)).mean()
