"""Reductions over the tokens a mask selects.

Mask convention (STYLE rule 5): 1 = a token sampled by the policy and trained on, 0 = prompt, observation,
tool output or padding. Masked positions are *selected away* with `torch.where`, not multiplied by 0, so a
padded position holding `inf` or `nan` cannot leak into the result and receives an exact zero gradient.

An empty selection (mask all 0) gives a mean of 0 rather than NaN: an all-padding micro-batch must not poison
a training step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def _select(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over positions where `mask` is nonzero.

    x, mask: same shape (mask is broadcast to x). Returns a scalar when `dim` is None, else `x` reduced on `dim`.
    """
    selected = _select(x, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def _count(x: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    ones = torch.broadcast_to(mask.bool(), x.shape).to(x.dtype)
    return ones.sum() if dim is None else ones.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is nonzero; 0 where nothing is selected.

    x, mask: same shape. Returns a scalar when `dim` is None, else `x` reduced on `dim`.
    """
    return masked_sum(x, mask, dim) / _count(x, mask, dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the selected positions.

    With `unbiased` (the default, as torch.std / TRL's `nanstd`), the sum of squares is divided by `count - 1`;
    a selection of fewer than two elements has variance 0 rather than NaN.
    x, mask: same shape. Returns a scalar when `dim` is None, else `x` reduced on `dim`.
    """
    mean = masked_mean(x, mask, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    squares = masked_sum((x - mean) ** 2, mask, dim)
    count = _count(x, mask, dim)
    denominator = (count - 1) if unbiased else count
    return squares / denominator.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to unit variance over the selected positions: `(x - mean) / sqrt(var + eps)`.

    Statistics are taken over all selected positions of the tensor (unbiased variance). With `shift_mean=False` the
    mean is added back, so only the scale changes. Masked positions of the result are 0.
    x, mask: same shape. Returns a tensor of x's shape.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask)
