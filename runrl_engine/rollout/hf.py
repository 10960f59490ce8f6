"""Sampling completions with a Hugging Face model: a KV-cached decode loop written for RL rollouts.

Why not `model.generate()`: rollouts need (1) each sample's randomness fixed by its own seed, so the same
prompt gets the same completions whatever batch or process it lands in (determinism, resume, and the
multi-process equivalence test depend on it); (2) one prefill per prompt shared by its G samples; (3)
finished rows dropped from the batch as they end. The loop does exactly that and nothing else: no beam
search, no constrained decoding, no speculative decoding. Position ids follow the attention mask, as in
training (`RolloutBatch.position_ids`), so left padding never shifts positions between the two.

Per-token cost is what matters on CPU, where a decode step of a small model is a few milliseconds of many
small ops: the KV cache is preallocated for the whole call (`rollout/kv_cache.py`: each token is written in
place instead of transformers' `DynamicLayer` concatenating the whole cache every step; models with
sliding-window, chunked or shared-KV layers keep transformers' cache layers), each row's uniforms for every step
are drawn from its generator up front (the same numbers, in the same order, as one draw per step), and sampled
tokens stay in a tensor, so the only per-step host sync is "did any row stop?". For Llama-family models on CPU
the decode steps after the prefill skip the transformers forward and its per-op overhead (`LlamaDecodeStep`,
`rollout/cpu_decode.py`, which says what it covers and where it agrees with the forward), and where a step would
read many repeated prompt positions (`prompt_sharing_pays`: long system prompts, many samples) each prompt's keys
and values are held once instead of per sample (`SharedPromptKVLayer`); everything else uses the model's own
forward. Under CPU autocast (`rollout_dtype: bfloat16`) every step uses the model's own forward,
so the whole decode runs at that precision.

Each completion also carries the log-prob of each sampled token under the distribution it was drawn from
(`sample_with_logprobs`: temperature, top-k and top-p applied), for the update's importance-sampling correction
(`algorithms/sampler_correction.py`). With float32 sampling they equal the trainer's recomputed log-probs to
float rounding (the cached decode and the trainer's full forward add in other orders; checked on the builtin
models in tests/engine/test_sampler_correction.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from runrl_engine.batch import pad_left
from runrl_engine.rollout.cpu_decode import LlamaDecodeStep, prompt_sharing_pays
from runrl_engine.rollout.kv_cache import decode_cache, share_prompts
# the backend-neutral types live in rollout/types.py; imported here because `generate` speaks them
from runrl_engine.rollout.types import Completion, SamplingParams


@dataclass
class DecodeStats:
    """Where a `generate` call's time went (summed over calls when one object is passed to several)."""
    prefill_s: float = 0.0  # the prompts' forward that fills the KV cache
    decode_s: float = 0.0  # everything after it: the cache laid out per row, sampling, the one-token forwards
    pack_s: float = 0.0  # of decode_s: laying the weights out for the decode matmuls (`PackedProjections`)
    steps: int = 0  # decode steps (tokens sampled per row, at most max_new_tokens)
    row_steps: int = 0  # sum over steps of the rows still running: the tokens sampled

    def add(self, other: "DecodeStats") -> None:
        for name in ("prefill_s", "decode_s", "pack_s", "steps", "row_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to [B, V] float logits (masked entries become -inf)."""
    if params.temperature != 1.0:
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


def sample_with_logprobs(logits: torch.Tensor, uniforms: torch.Tensor,
                         params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row by inverse-CDF sampling ([B, V] logits and [B] uniforms in [0, 1) -> [B] ids), and [B]
    float32 log-probs of the picked ids under the distribution they were drawn from: the temperature-scaled,
    top-k/top-p filtered softmax (vLLM's `processed_logprobs`, what TRL's importance-sampling correction asks vLLM
    for). Greedy rows: the argmax, with the plain model's log-softmax there (vLLM's choice too)."""
    if params.temperature == 0:
        idx = logits.argmax(dim=-1)
        return idx, logits.float().log_softmax(dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    probs = filter_logits(logits.float(), params).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    idx = idx.clamp(max=probs.shape[-1] - 1)
    return idx, probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1).log()


def draw_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """[len(seeds), steps] uniforms, row k from a generator seeded with `seeds[k]`: element t is the t-th draw of
    that generator, so a row's numbers do not depend on which other rows share the batch."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds])



@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: list[list[int]], *, num_samples: int, seeds: Sequence[int],
             params: SamplingParams, stop_ids: set[int], pad_id: int,
             stats: DecodeStats | None = None) -> list[Completion]:
    """`num_samples` completions of each prompt; result index = prompt_index * num_samples + sample_index.

    `seeds[k]` seeds completion k (same indexing). The model is used as is (call `.eval()` first). `stats`, when
    given, has this call's timings added to it.
    """
    t_start = time.perf_counter()
    device = next(model.parameters()).device
    n, steps = len(prompts) * num_samples, params.max_new_tokens
    assert len(seeds) == n, "one seed per completion"
    uniforms = draw_uniforms(seeds, steps).to(device)
    stop = torch.tensor(sorted(stop_ids), device=device)

    ids, mask = pad_left(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    width = mask.shape[1]
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = decode_cache(model, width + steps)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
    cache = out.cache
    logits = out.logits[:, -1, :]
    t_decode = time.perf_counter()
    step = LlamaDecodeStep.build(model, cache) if steps > 1 else None
    if num_samples > 1:  # one prefill per prompt, shared by its samples
        element = next(model.parameters()).element_size()
        if step is not None and prompt_sharing_pays(model.config, len(prompts), n, width, element):
            share_prompts(cache, num_samples, steps, mask)  # each prompt's keys and values kept once
        else:
            cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        pos = pos.repeat_interleave(num_samples, dim=0)

    # the attention mask of every step is a prefix of one preallocated buffer (no per-token concatenation)
    full_mask = torch.ones(n, width + steps, dtype=mask.dtype, device=device)
    full_mask[:, :width] = mask
    sampled = torch.full((n, steps), pad_id, dtype=torch.long, device=device)  # [completion, step]
    sampled_logp = torch.zeros((n, steps), dtype=torch.float32, device=device)  # the sampler's log-prob of each
    lengths = torch.full((n,), steps, dtype=torch.long)  # completion lengths; rows that stop get theirs set
    active = torch.arange(n, device=device)  # completion index of each row still in the batch
    pos = pos[:, -1:]
    prompt_width = width
    row_steps = 0
    padded = bool((mask == 0).any())  # no padding: the step runs unmasked attention, as transformers does
    for t in range(steps):
        row_steps += active.numel()
        nxt, nxt_logp = sample_with_logprobs(logits, uniforms[active, t], params)
        sampled[active, t] = nxt
        sampled_logp[active, t] = nxt_logp
        if t == steps - 1:
            break
        done = torch.isin(nxt, stop)
        if done.any():  # drop finished rows so later steps cost only what is still running
            lengths[active[done].cpu()] = t + 1
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            active, nxt, full_mask, pos = active[keep], nxt[keep], full_mask[keep], pos[keep]
            padded = bool((full_mask[:, :prompt_width] == 0).any())
        width += 1
        pos = pos + 1
        if step is not None:
            logits = step(nxt.unsqueeze(-1), pos, cache, full_mask[:, :width] if padded else None)
        else:
            out = model(input_ids=nxt.unsqueeze(-1), attention_mask=full_mask[:, :width], position_ids=pos,
                        cache=cache, use_cache=True)
            logits = out.logits[:, -1, :]
    rows, lens, row_logps = sampled.cpu().tolist(), lengths.tolist(), sampled_logp.cpu().tolist()
    if stats is not None:
        t_end = time.perf_counter()
        stats.add(DecodeStats(prefill_s=t_decode - t_start, decode_s=t_end - t_decode, row_steps=row_steps,
                              pack_s=step.packed.pack_s if step is not None else 0.0, steps=max(lens, default=0)))
    # a row that ran to the last step finished if that step sampled a stop token
    last_stops = torch.isin(sampled[:, -1], stop).tolist() if steps else [False] * n
    return [Completion(tokens=rows[k][: lens[k]], finished=lens[k] < steps or last_stops[k],
                       logprobs=row_logps[k][: lens[k]]) for k in range(n)]
