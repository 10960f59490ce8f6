"""Per-token log-probabilities and entropies from logits, without a full-vocabulary log-softmax.

`torch.log_softmax(logits, -1).gather(...)` allocates a second `[B, T, V]` tensor (plus another for its
gradient) just to read one entry per row. Here the rows are processed in chunks: for fp32/fp64 each chunk is
`gathered logit - logsumexp(row)`; half-precision logits are upcast to fp32 one chunk at a time, because
`logsumexp` in bf16 loses the small differences that log-probability ratios are made of (TRL's
`selective_log_softmax` notes the same instability). Results are fp32 for half-precision inputs, so the
importance ratio `exp(logp - old_logp)` is not quantised to bf16's 8 bits.

Chunks are slices along existing dimensions, so a non-contiguous view such as `logits[:, :-1]` is never
copied whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["selective_log_softmax", "entropy_from_logits"]

# Elements of a `[rows, vocab]` chunk processed at once: 2**25 fp32 values = 128 MiB of temporaries.
_CHUNK_ELEMENTS = 2**25


def _rows_per_chunk(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _map_rows(fn: Callable[..., Tensor], logits: Tensor, *others: Tensor, rows: int) -> Tensor:
    """Apply `fn(logits_chunk [n, V], *other_chunks [n, ...]) -> [n, ...]` over all rows of `logits [..., V]`."""
    if logits.dim() == 1:
        return _map_rows(fn, logits.unsqueeze(0), *(o.unsqueeze(0) for o in others), rows=rows).squeeze(0)
    if logits.dim() > 2:
        try:  # contiguous rows: one flat pass; a strided view (e.g. logits[:, :-1]) falls through to a row loop
            flat = logits.view(-1, logits.shape[-1])
        except RuntimeError:
            flat = None
        if flat is not None:
            lead = logits.shape[:-1]
            flat_others = [o.reshape(-1, *o.shape[len(lead) :]) for o in others]
            return _map_rows(fn, flat, *flat_others, rows=rows).reshape(lead)
    if logits.dim() == 2:
        n = logits.shape[0]
        if n <= rows:
            return fn(logits, *others)
        return torch.cat([fn(logits[s : s + rows], *(o[s : s + rows] for o in others)) for s in range(0, n, rows)])
    return torch.stack([_map_rows(fn, logits[i], *(o[i] for o in others), rows=rows) for i in range(logits.shape[0])])


def _chunk_logps(logits: Tensor, index: Tensor) -> Tensor:
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_entropy(logits: Tensor) -> Tensor:
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    logps = torch.log_softmax(logits, dim=-1)
    return -(logps.exp() * logps).sum(-1)


def selective_log_softmax(
    logits: Tensor, index: Tensor, *, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """`log_softmax(logits / temperature)[..., index]`, one entry per row.

    logits: `[..., V]` (any float dtype); index: `[...]` integer token ids.
    Returns `[...]`: fp32 for half-precision logits, else logits' dtype. Differentiable with respect to logits.
    `chunk_size` = rows per chunk (default: as many as fit 2**25 elements).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if index.shape != logits.shape[:-1]:
        raise ValueError(f"index shape {tuple(index.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}")
    if temperature != 1.0:
        logits = logits / temperature
    rows = _rows_per_chunk(logits.shape[-1], chunk_size)
    return _map_rows(_chunk_logps, logits, index.long(), rows=rows)


def entropy_from_logits(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Shannon entropy (nats) of `softmax(logits)` along the last axis, computed chunk by chunk.

    logits: `[..., V]`. Returns `[...]` (fp32 for half-precision logits, else logits' dtype).
    """
    rows = _rows_per_chunk(logits.shape[-1], chunk_size)
    return _map_rows(_chunk_entropy, logits, rows=rows)
