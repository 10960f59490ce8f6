"""Sampling completions with a Hugging Face model: a KV-cached decode loop written for RL rollouts.

Why not `model.generate()`: rollouts need (1) each sample's randomness fixed by its own seed, so the same
prompt gets the same completions whatever batch or process it lands in (determinism, resume, and the
multi-process equivalence test depend on it); (2) one prefill per prompt shared by its G samples; (3)
finished rows dropped from the batch as they end. The loop does exactly that and nothing else: no beam
search, no constrained decoding, no speculative decoding. Position ids follow the attention mask, as in
training (`RolloutBatch.position_ids`), so left padding never shifts positions between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from runrl_engine.batch import pad_left


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Completion:
    tokens: list[int]  # sampled ids, the stop token included when `finished`
    finished: bool  # ended with a stop token (False: hit max_new_tokens)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to [B, V] float logits (masked entries become -inf)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass *before* it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, generators: Sequence[torch.Generator], params: SamplingParams) -> torch.Tensor:
    """One token per row by inverse-CDF sampling, row i drawing its uniform from `generators[i]`."""
    probs = filter_logits(logits.float(), params).softmax(dim=-1)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(probs.device)
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: list[list[int]], *, num_samples: int, seeds: Sequence[int],
             params: SamplingParams, stop_ids: set[int], pad_id: int) -> list[Completion]:
    """`num_samples` completions of each prompt; result index = prompt_index * num_samples + sample_index.

    `seeds[k]` seeds completion k (same indexing). The model is used as is (call `.eval()` first).
    """
    device = next(model.parameters()).device
    n = len(prompts) * num_samples
    assert len(seeds) == n, "one seed per completion"
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    stop = torch.tensor(sorted(stop_ids), device=device)

    ids, mask = pad_left(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache
    logits = out.logits[:, -1, :]
    if num_samples > 1:  # one prefill per prompt, shared by its samples
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        pos = pos.repeat_interleave(num_samples, dim=0)

    # the attention mask of every step is a prefix of one preallocated buffer (no per-token concatenation)
    width = mask.shape[1]
    full_mask = torch.ones(n, width + params.max_new_tokens, dtype=mask.dtype, device=device)
    full_mask[:, :width] = mask
    tokens: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    active = list(range(n))  # completion index of each row still in the batch
    for _ in range(params.max_new_tokens):
        nxt = sample(logits, [generators[k] for k in active], params)
        done = torch.isin(nxt, stop)
        for k, tok in zip(active, nxt.tolist()):
            tokens[k].append(tok)
        done_rows = done.nonzero().flatten().tolist()
        for row in done_rows:
            finished[active[row]] = True
        if len(done_rows) == len(active) or len(tokens[active[0]]) >= params.max_new_tokens:
            break
        if done_rows:  # drop finished rows so later steps cost only what is still running
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            active = [active[i] for i in keep.tolist()]
            nxt, full_mask, pos = nxt[keep], full_mask[keep], pos[keep]
        width += 1
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt.unsqueeze(-1), attention_mask=full_mask[:, :width], position_ids=pos, cache=cache,
                    use_cache=True)
        logits = out.logits[:, -1, :]
    return [Completion(tokens=t, finished=f) for t, f in zip(tokens, finished)]
