"""The update's forward over a `RolloutBatch`: each distinct prompt computed once for all its completions.

GRPO-style batches hold G completions of every prompt. A plain forward over `[prompt][completion]` rows runs
each prompt G times, in the training forward, its backward, the reference pass and the old-log-prob pass. Here
a micro-batch whose rows repeat a prompt runs in two calls of the same model: the distinct prompts (U rows) with
a fresh KV cache, then the completions of all rows on that cache, its entries gathered per row (`prompt_groups`).
The gather is differentiable, so gradients from every completion flow back into the one prompt forward. The
result is the plain forward's, up to floating-point rounding (matmuls of other shapes); for the first completion
token the prediction comes from the prompt call's last position.

Used only where it is exact: every cache layer plain full attention (`DynamicLayer`; sliding-window and chunked
models keep the plain forward), and never while gradient checkpointing is on with gradients enabled, because
transformers drops the cache inside checkpointed layers (the caller decides; a dropped cache is also caught
here by its length). Micro-batches with distinct prompts only take the plain single forward. Not under FSDP or
DeepSpeed ZeRO-3 either (the trainer's choice): their per-call parameter gathering is hooked on each call's
outputs, which a gradient arriving through the cache bypasses. DDP is fine (tested with 2 processes).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from runrl_engine.batch import RolloutBatch

# call(input_ids=, attention_mask=, position_ids=, logits_to_keep=, cache=) -> outputs, each [rows, keep, ...]
ModelCall = Callable[..., tuple[Tensor, ...]]


def sequence_outputs(call: ModelCall, mb: RolloutBatch, keep: int, *, config: Any,
                     share_prompts: bool) -> tuple[Tensor, ...]:
    """The model's outputs (logits, values, ...) at the last `keep` positions of every row's
    `[prompt][completion]` sequence, each [b, keep, ...], with shared prompts computed once when allowed.

    `keep` may reach at most one position into the prompt (`completion length + 1`: the prompt's last position
    predicts the first completion token), which is all the update reads. `config` is the model's config (what
    cache layers it needs)."""
    C = mb.completion_ids.shape[1]
    if keep > C + 1:
        raise ValueError(f"keep={keep} reaches more than one position into the prompt (completion length {C})")
    if share_prompts:
        first, group = mb.prompt_groups()
        if len(first) < len(mb):
            cache = DynamicCache(config=config)
            if all(type(layer) is DynamicLayer for layer in cache.layers):
                return _shared_prompt_outputs(call, mb, keep, first, group, cache)
    return call(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                logits_to_keep=keep, cache=None)


def _shared_prompt_outputs(call: ModelCall, mb: RolloutBatch, keep: int, first: Tensor, group: Tensor,
                           cache: DynamicCache) -> tuple[Tensor, ...]:
    P, C = mb.prompt_ids.shape[1], mb.completion_ids.shape[1]
    positions = mb.position_ids
    head = call(input_ids=mb.prompt_ids[first], attention_mask=mb.prompt_mask[first],
                position_ids=positions[first, :P], logits_to_keep=1, cache=cache)
    if cache.get_seq_length() != P:
        raise RuntimeError("the prompt forward did not fill the KV cache (gradient checkpointing drops it: "
                           "share prompts only when it is off)")
    cache.batch_select_indices(group)  # each row reads its prompt's keys and values (gradients sum back)
    tail = call(input_ids=mb.completion_ids, attention_mask=mb.attention_mask, position_ids=positions[:, P:],
                logits_to_keep=min(keep, C), cache=cache)
    if cache.get_seq_length() != P + C:
        raise RuntimeError("the completion forward did not extend the KV cache of its prompts")
    if keep <= C:
        return tail
    return tuple(torch.cat([h[group], t], dim=1) for h, t in zip(head, tail))
