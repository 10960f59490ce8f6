"""The update's forward over a `RolloutBatch`: each distinct prompt computed once for all its completions.

GRPO-style batches hold G completions of every prompt. A plain forward over `[prompt][completion]` rows runs
each prompt G times, in the training forward, its backward, the reference pass and the old-log-prob pass. Here
a micro-batch whose rows repeat a prompt runs in two calls of the same model: the distinct prompts (U rows) with
a fresh KV cache, then the completions of all rows on that cache, its entries gathered per row (`prompt_groups`).
The gather is differentiable, so gradients from every completion flow back into the one prompt forward, summed in
a fixed order (`select_rows`: with tensor indexing, CPU threads summed them in arrival order). The
result is the plain forward's, up to floating-point rounding (matmuls of other shapes); for the first completion
token the prediction comes from the prompt call's last position.

Used only where it is exact: every cache layer plain full attention (`DynamicLayer`; sliding-window and chunked
models keep the plain forward), and never while gradient checkpointing is on with gradients enabled, because
transformers drops the cache inside checkpointed layers (the caller decides; a dropped cache is also caught
here by its length). Micro-batches with distinct prompts only take the plain single forward. Not under FSDP or
DeepSpeed ZeRO-3 either (the trainer's choice): their per-call parameter gathering is hooked on each call's
outputs, which a gradient arriving through the cache bypasses. DDP is fine (tested with 2 processes).

Padding-free (`packed=True`): the same two calls, each over ONE packed row instead of a padded batch: the
distinct prompts' real tokens end to end, then every row's real completion tokens end to end, with a 4D
attention mask that lets each token see exactly what it sees in the padded layout (its own prompt, and its
own completion up to itself) and position ids restarting per sequence. Completions of a GRPO group differ in
length (they stop at different tokens), so the padded layout spends a large share of the update (~30 % on the
SmolLM2 benchmarks) on padding positions; packed, the matmuls run over real tokens only. The price is
attention over the whole packed row, masked (quadratic in the micro-batch's tokens, ~2x the padded layout's
score computations when all sequences are of similar length), which stays a few percent of the matmul work at
RL shapes (hundreds of tokens per sequence) but not at many thousands of tokens per micro-batch. Outputs are
placed in the padded `[b, C, ...]` layout (zeros at padding positions, which every caller masks).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from runrl_engine.batch import RolloutBatch

# call(input_ids=, attention_mask=, position_ids=, logits_to_keep=, cache=) -> outputs, each [rows, keep, ...]
ModelCall = Callable[..., tuple[Tensor, ...]]


# per_token(logits [..., V], the tokens they predict [...]) -> per-position tensors, each [...]
PerToken = Callable[[Tensor, Tensor], tuple[Tensor, ...]]


def completion_outputs(call: ModelCall, mb: RolloutBatch, per_token: PerToken | None = None, *, config: Any,
                       share_prompts: bool, packed: bool = False) -> tuple[Tensor, ...]:
    """For every completion token, `per_token` of the logits that predict it (the call's first output at the
    position before the token; without `per_token`, that output itself), then the call's other outputs at those
    positions: each [b, C, ...], zeros at padding positions (which every caller masks). Each distinct prompt is
    computed once when `share_prompts` allows, and without padding positions when `packed` and that computes less
    (`_packing_pays`; it needs `share_prompts`' conditions too: a plain KV cache). `config` is the model's config
    (what cache layers it needs).

    `per_token` runs on the logits as the calls return them (the padded rows, or the packed row's real
    positions), so no `[b, C, V]` logits tensor is assembled from pieces: on the packed path that assembly
    (zeros, scatter, the prompt's position prepended) and its gradient read and wrote ~10 full-vocabulary tensors
    per micro-batch, 8-12 % of a SmolLM2-135M W3 update (benchmarks/README.md)."""
    if per_token is None:
        per_token = _as_is
    ids = mb.completion_ids
    b, C = ids.shape
    route = _route(mb, config, share_prompts, packed)
    if route is None:
        logits, *rest = _plain(call, mb)
        return (*per_token(logits[:, :-1], ids), *(r[:, :-1] for r in rest))
    first, group, use_packed, cache = route
    if not use_packed:
        head, tail = _shared_prompt_calls(call, mb, first, group, cache)
        (h_logits, *h_rest), (t_logits, *t_rest) = head, tail
        firsts = per_token(h_logits, ids[:, 0])  # each [b]: the prompt's last position predicts token 0
        laters = per_token(t_logits[:, :-1], ids[:, 1:]) if C > 1 else tuple(f.unsqueeze(1)[:, :0] for f in firsts)
        return (*(torch.cat([f.unsqueeze(1), t], dim=1) for f, t in zip(firsts, laters)),
                *(torch.cat([h.unsqueeze(1), t[:, :-1]], dim=1) for h, t in zip(h_rest, t_rest)))
    head, tail, rows, cols = _packed_calls(call, mb, first, group, cache)
    (h_logits, *h_rest), (t_logits, *t_rest) = head, tail
    # a packed completion position (row, col) predicts token col + 1 of its row, which exists unless col is the
    # row's last real token; that position's prediction is computed (with a stand-in target) and dropped
    nxt = (cols + 1).clamp(max=C - 1)
    real = (mb.completion_mask.bool()[rows, nxt] & (cols + 1 < C)).nonzero().squeeze(1)
    at_rows = torch.cat([torch.arange(b, device=rows.device), rows[real]])
    at_cols = torch.cat([torch.zeros(b, dtype=cols.dtype, device=cols.device), nxt[real]])
    firsts, laters = per_token(h_logits, ids[:, 0]), per_token(t_logits, ids[rows, nxt])

    def placed(f: Tensor, t: Tensor) -> Tensor:
        values = torch.cat([f, t.index_select(0, real)])  # index_select: its backward adds in index order
        return values.new_zeros(b, C, *values.shape[1:]).index_put((at_rows, at_cols), values)

    return (*(placed(f, t) for f, t in zip(firsts, laters)), *(placed(h, t) for h, t in zip(h_rest, t_rest)))


def _as_is(outputs: Tensor, targets: Tensor) -> tuple[Tensor]:
    return (outputs,)


def _route(mb: RolloutBatch, config: Any, share_prompts: bool, packed: bool
           ) -> tuple[Tensor, Tensor, bool, DynamicCache] | None:
    """(first, group, packed, the empty cache) of the shared-prompt paths, or None for the plain forward."""
    if not share_prompts:
        return None
    first, group = mb.prompt_groups()
    cache = DynamicCache(config=config)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    if packed and _packing_pays(mb, first, config):
        return first, group, True, cache
    if len(first) < len(mb):
        return first, group, False, cache
    return None


def _plain(call: ModelCall, mb: RolloutBatch) -> tuple[Tensor, ...]:
    """One call over the padded `[prompt][completion]` rows: outputs at the last C + 1 positions."""
    return call(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                logits_to_keep=mb.completion_ids.shape[1] + 1, cache=None)


def select_rows(cache: DynamicCache, rows: Tensor) -> None:
    """`cache.batch_select_indices(rows)` (rows may repeat) with a backward that is the same from run to run.

    transformers selects with tensor indexing, whose backward on CPU is `index_put_(accumulate=True)`: with more
    than one thread and at least 32768 elements it adds floats with atomics in whatever order the threads arrive,
    so the gradient of a prompt's keys and values, summed over its completions, changed in the last bits from run
    to run (and a PPO run drifted to another result). `index_select`'s backward (`index_add_`) adds in index order
    on CPU. On CUDA both are nondeterministic unless `torch.use_deterministic_algorithms` is on."""
    for layer in cache.layers:
        if layer.get_seq_length() > 0:  # as transformers' DynamicLayer.batch_select_indices
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)


def _shared_prompt_calls(call: ModelCall, mb: RolloutBatch, first: Tensor, group: Tensor,
                        cache: DynamicCache) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The distinct prompts' call, then the completions' on its cache: (outputs at each row's prompt's last
    position, each [b, ...]; the completion call's outputs at every completion position, each [b, C, ...])."""
    P, C = mb.prompt_ids.shape[1], mb.completion_ids.shape[1]
    positions = mb.position_ids
    head = call(input_ids=mb.prompt_ids[first], attention_mask=mb.prompt_mask[first],
                position_ids=positions[first, :P], logits_to_keep=1, cache=cache)
    if cache.get_seq_length() != P:
        raise RuntimeError("the prompt forward did not fill the KV cache (gradient checkpointing drops it: "
                           "share prompts only when it is off)")
    select_rows(cache, group)  # each row reads its prompt's keys and values (gradients sum back)
    tail = call(input_ids=mb.completion_ids, attention_mask=mb.attention_mask, position_ids=positions[:, P:],
                logits_to_keep=C, cache=cache)
    if cache.get_seq_length() != P + C:
        raise RuntimeError("the completion forward did not extend the KV cache of its prompts")
    return tuple(h[:, -1].index_select(0, group) for h in head), tail


# Masked attention runs at about half the matmul rate here: SDPA's CPU flash kernel over a 1000-token packed row of
# SmolLM2 measured ~95 GFLOP/s forward against ~160 GFLOP/s for the projections (2 cores, fp32). Pairs count double.
ATTENTION_COST_FACTOR = 2


def flop_costs(config: Any) -> tuple[int, int, int] | None:
    """(FLOPs per position through every layer's projections, per query-key pair of attention over all layers
    weighted by ATTENTION_COST_FACTOR, per position scored by the LM head) of a decoder `config`, forward only;
    None when the config does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden, heads, layers = text.hidden_size, text.num_attention_heads, text.num_hidden_layers
    except AttributeError:
        return None
    d = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    mlp = getattr(text, "intermediate_size", None) or 4 * hidden
    return (layers * 2 * (hidden * d * (2 * heads + 2 * kv_heads) + 3 * hidden * mlp),
            ATTENTION_COST_FACTOR * layers * 4 * d * heads, 2 * hidden * getattr(text, "vocab_size", 0))


def packed_rows_pay(config: Any, batches: list[list[int]]) -> bool:
    """Whether sequences of the given lengths, in these batches, cost fewer FLOPs packed into one row per batch
    (a dense block-causal mask: attention over every pair of the row) than padded to each batch's longest."""
    costs = flop_costs(config)
    if costs is None:
        return True
    per_position, per_pair, per_scored = costs
    padded = sum(len(b) * max(b) * (per_position + per_scored + max(b) * per_pair) for b in batches if b)
    packed = sum(sum(b) * (per_position + per_scored + sum(b) * per_pair) for b in batches if b)
    return packed < padded


def _packing_pays(mb: RolloutBatch, first: Tensor, config: Any) -> bool:
    """Whether the packed layout computes less than the padded one, counting per layer the projection FLOPs per
    position (and the LM head's per completion position) and the attention FLOPs per query-key pair, which the
    packed row's mask spends on every pair of its tokens. Measured on SmolLM2-135M (8 completions of up to 64
    tokens after a 50-token prompt): without padding packed is ~10 % slower, with a third of the positions padding
    ~15 % faster (W4's shape, 8 completions of up to 128 tokens after ~230 prompt tokens: ~30 % faster)."""
    costs = flop_costs(config)
    if costs is None:
        return True  # an unusual config: padding is the common waste
    per_position, per_pair, per_scored = costs
    P, C = mb.prompt_ids.shape[1], mb.completion_ids.shape[1]
    rows, prompts = len(mb), len(first)
    sp, sc = int(mb.prompt_mask[first].sum()), int(mb.completion_mask.sum())
    padded = ((prompts * P + rows * C) * per_position + rows * C * per_scored
              + (prompts * P * P + rows * C * (P + C)) * per_pair)
    packed = (sp + sc) * per_position + sc * per_scored + (sp * sp + sc * (sp + sc)) * per_pair
    return packed < padded


def _packed_calls(call: ModelCall, mb: RolloutBatch, first: Tensor, group: Tensor, cache: DynamicCache
                  ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor, Tensor]:
    """The two calls over one packed row each: (outputs at each row's prompt's last position, each [b, ...];
    outputs at every real completion position, each [SC, ...]; that position's row [SC]; its column in the
    padded completion layout [SC])."""
    dev = mb.prompt_ids.device
    p_mask, c_mask = mb.prompt_mask[first].bool(), mb.completion_mask.bool()
    p_len, c_len = p_mask.sum(dim=1), c_mask.sum(dim=1)  # [U], [b]
    # which packed position belongs to which sequence, and its position id within that sequence
    p_seq = torch.repeat_interleave(torch.arange(len(first), device=dev), p_len)  # [SP] prompt index
    c_seq = torch.repeat_interleave(torch.arange(len(mb), device=dev), c_len)  # [SC] row index
    p_pos = _ranks(p_seq)
    c_col = _ranks(c_seq)  # the token's column in the padded completion layout
    c_pos = p_len[group][c_seq] + c_col
    # prompts: causal within each prompt; completions: their row's whole prompt, then causal within the row
    p_attend = (p_seq[:, None] == p_seq[None, :]) & (p_pos[None, :] <= p_pos[:, None])
    c_attend = torch.cat([group[c_seq][:, None] == p_seq[None, :],
                          (c_seq[:, None] == c_seq[None, :]) & (c_col[None, :] <= c_col[:, None])], dim=1)
    last = torch.cumsum(p_len, dim=0) - 1  # each prompt's last packed position (predicts the first completion token)
    head = call(input_ids=mb.prompt_ids[first][p_mask][None], attention_mask=p_attend[None, None],
                position_ids=p_pos[None], logits_to_keep=last, cache=cache)
    if cache.get_seq_length() != len(p_seq):
        raise RuntimeError("the prompt forward did not fill the KV cache (gradient checkpointing drops it: "
                           "pack only when it is off)")
    tail = call(input_ids=mb.completion_ids[c_mask][None], attention_mask=c_attend[None, None],
                position_ids=c_pos[None], logits_to_keep=0, cache=cache)
    return tuple(h[0].index_select(0, group) for h in head), tuple(t[0] for t in tail), c_seq, c_col


def _ranks(seq: Tensor) -> Tensor:
    """For a sorted run-length sequence id per position ([0, 0, 0, 1, 1, ...]), each position's index in its run."""
    start = torch.zeros_like(seq)
    if seq.numel():
        change = torch.ones_like(seq, dtype=torch.bool)
        change[1:] = seq[1:] != seq[:-1]
        start = torch.cummax(torch.where(change, torch.arange(len(seq), device=seq.device), 0), dim=0).values
    return torch.arange(len(seq), device=seq.device) - start
