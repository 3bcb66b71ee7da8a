"""An exact fast path for tensor cores: similarities in fp16/bf16, a proven bound on their error for
unit vectors, and float64 recomputation of only the pairs the bound cannot decide.

For unit vectors u, t and inputs rounded to a format with unit roundoff e (fp16 2^-11, bf16 2^-8)
and absolute underflow error h (half the smallest subnormal), each product's error is at most
(2e + e^2)|u_i||t_i| + h(1 + e)(|u_i| + |t_i|) + h^2; summed over d, with sum |u_i||t_i| <= 1 and
sum |u_i| <= sqrt(d) (Cauchy-Schwarz), the rounding of the inputs moves s = u.t by at most
    (2e + e^2) + 2h(1 + e) sqrt(d) + d h^2.
The products are accumulated in fp32 (error <= gamma_d (1 + e)^2 with gamma_d = d 2^-24 / (1 - d 2^-24),
taken 4x for accumulators that are not strictly round-to-nearest), a low-precision output adds
e (1 + bound), and the margin s - xi in fp32 adds 2^-23. A pair whose low-precision margin is
further than that bound from 0 is decided; Surplus needs the value of every positive margin and
the row maximum needs its candidates, so those pairs, and the undecided band, are recomputed in
float64 from the float32 inputs. Scores, Counting and max_margin are then those of the float64
reference (hnal_ray.score.reference), not of a rounded computation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hnal_ray.score.scoring import as_float32_tensor, check_weight

FORMATS = {torch.float16: (2.0**-11, 2.0**-25), torch.bfloat16: (2.0**-8, 2.0**-134)}


def error_bound(dim: int, low: torch.dtype, low_output: bool = False) -> float:
    """Largest |s_low - s| for unit vectors of `dim` values rounded to `low` (see the module doc),
    plus the fp32 margin rounding."""
    e, h = FORMATS[low]
    inputs = (2 * e + e * e) + 2 * h * (1 + e) * math.sqrt(dim) + dim * h * h
    u = 2.0**-24
    accumulate = 4 * (dim * u / (1 - dim * u)) * (1 + e) ** 2
    bound = inputs + accumulate
    if low_output:
        bound += e * (1 + bound)
    return bound + 2.0**-23


@dataclass(frozen=True)
class LowPrecScores:
    """scores (n,) float64; max_margin (n,) float32; pairs scored; pairs recomputed in float64."""

    scores: np.ndarray
    max_margin: np.ndarray
    pairs: int
    recomputed: int

    @property
    def band_share(self) -> float:
        return self.recomputed / max(self.pairs, 1)


def low_precision_similarity(p: torch.Tensor, a: torch.Tensor, low: torch.dtype) -> tuple[torch.Tensor, bool]:
    """(m, n) similarities from inputs rounded to `low`, and whether the output was rounded to `low`.
    On a GPU the tensor cores multiply `low` inputs with fp32 accumulation and, where torch offers
    it (`mm(..., out_dtype=float32)`), an fp32 output; elsewhere the rounded inputs are multiplied
    in float32, which is the same arithmetic."""
    if p.device.type == "cuda":
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        try:
            return torch.mm(p.to(low), a.to(low).T, out_dtype=torch.float32), False
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: a `low` output
            return (p.to(low) @ a.to(low).T).float(), True
    return p.to(low).float() @ a.to(low).float().T, False


def score_pool_lowprec(pool_emb: np.ndarray, anchor_emb: np.ndarray, thresholds: np.ndarray, weight: str,
                       device: torch.device | None = None, block_pool: int = 4096, block_anchor: int = 8192,
                       low: torch.dtype = torch.float16) -> LowPrecScores:
    """The same outputs as `score_pool` (in float64 arithmetic on the float32 inputs), computing
    almost every pair in `low` precision. Shapes as for `score_pool`; inputs L2-normalised."""
    check_weight(weight)
    device = device or torch.device("cpu")
    n_u, n_a = len(pool_emb), len(anchor_emb)
    scores, max_margin = np.zeros(n_u), np.full(n_u, -np.inf, np.float32)
    anchors = as_float32_tensor(anchor_emb).to(device)
    xi = as_float32_tensor(thresholds).to(device)
    pool = as_float32_tensor(pool_emb)
    recomputed = 0
    with torch.inference_mode():
        for u0 in range(0, n_u, block_pool):
            p = pool[u0:u0 + block_pool].to(device)
            acc = torch.zeros(len(p), dtype=torch.float64, device=device)
            best = torch.full((len(p),), -torch.inf, dtype=torch.float64, device=device)
            for a0 in range(0, n_a, block_anchor):
                a, x = anchors[a0:a0 + block_anchor], xi[a0:a0 + block_anchor]
                s_low, rounded_out = low_precision_similarity(p, a, low)
                delta = error_bound(p.shape[1], low, rounded_out)
                margin = s_low.sub_(x)
                row_max = margin.amax(dim=1, keepdim=True)
                # pairs whose exact value matters: possible positives (Surplus: all of them; Counting:
                # the undecided band) and possible row maxima
                need = margin >= row_max - 2 * delta
                if weight == "surplus":
                    need |= margin >= -delta
                else:
                    need |= margin.abs() <= delta
                    acc += (margin > delta).sum(dim=1, dtype=torch.float64)
                r, c = need.nonzero(as_tuple=True)
                recomputed += len(r)
                exact = (p[r].double() * a[c].double()).sum(dim=1) - x[c].double()
                if weight == "surplus":
                    acc.index_add_(0, r, exact.clamp(min=0))
                else:
                    band = margin[r, c].abs() <= delta
                    acc.index_add_(0, r[band], (exact[band] > 0).double())
                best = torch.maximum(best, torch.full_like(best, -torch.inf).scatter_reduce_(
                    0, r, exact, reduce="amax", include_self=True))
            scores[u0:u0 + len(p)] = acc.cpu().numpy()
            max_margin[u0:u0 + len(p)] = best.float().cpu().numpy()
    return LowPrecScores(scores, max_margin, n_u * n_a, recomputed)
