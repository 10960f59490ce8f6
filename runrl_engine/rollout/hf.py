"""Sampling completions with a Hugging Face model: a KV-cached decode loop written for RL rollouts.

Why not `model.generate()`: rollouts need (1) each sample's randomness fixed by its own seed, so the same
prompt gets the same completions whatever batch or process it lands in (determinism, resume, and the
multi-process equivalence test depend on it); (2) one prefill per prompt shared by its G samples; (3)
finished rows dropped from the batch as they end. The loop does exactly that and nothing else: no beam
search, no constrained decoding, no speculative decoding. Position ids follow the attention mask, as in
training (`RolloutBatch.position_ids`), so left padding never shifts positions between the two.

Per-token cost is what matters on CPU, where a decode step of a small model is a few milliseconds of many
small ops: the KV cache is preallocated for the whole call (`PreallocatedKVLayer`: each token is written in
place instead of transformers' `DynamicLayer` concatenating the whole cache every step), each row's uniforms
for every step are drawn from its generator up front (the same numbers, in the same order, as one draw per
step), and sampled tokens stay in a tensor, so the only per-step host sync is "did any row stop?". For
Llama-family models on CPU (`LlamaDecodeStep`) the decode steps after the prefill skip the transformers forward
and its per-op overhead, with fused projections on pre-packed weights (`PackedProjections`: what matters once the
weights are far larger than the caches, as for SmolLM2's 538 MB); everything else (other architectures, GPUs,
where that path is untested) uses the model's own forward. Models with sliding-window, chunked or shared-KV layers
keep transformers' cache layers. The fast step computes what the transformers forward computes, to float
rounding (MKL's packed kernels round differently from `F.linear`'s): the tests compare the sampled tokens of
both paths token for token on the builtin models, and the step's logits with a full forward's. Under CPU autocast
(`rollout_dtype: bfloat16`) every step uses the model's own forward, so the whole decode runs at that precision.

Each completion also carries the log-prob of each sampled token under the distribution it was drawn from
(`sample_with_logprobs`: temperature, top-k and top-p applied), for the update's importance-sampling correction
(`algorithms/sampler_correction.py`). With float32 sampling they equal the trainer's recomputed log-probs to
float rounding (the cached decode and the trainer's full forward add in other orders; measured on the builtin
models in tests/engine/test_sampler_correction.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from runrl_engine.batch import pad_left


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy (the most likely token; top-p/top-k have no effect then)
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class DecodeStats:
    """Where a `generate` call's time went (summed over calls when one object is passed to several)."""
    prefill_s: float = 0.0  # the prompts' forward that fills the KV cache
    decode_s: float = 0.0  # every step after it: sampling, the one-token forwards, weight packing
    pack_s: float = 0.0  # of decode_s: laying the weights out for the decode matmuls (`PackedProjections`)
    steps: int = 0  # decode steps (tokens sampled per row, at most max_new_tokens)
    row_steps: int = 0  # sum over steps of the rows still running: the tokens sampled

    def add(self, other: "DecodeStats") -> None:
        for name in ("prefill_s", "decode_s", "pack_s", "steps", "row_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Completion:
    tokens: list[int]  # sampled ids, the stop token included when `finished`
    finished: bool  # ended with a stop token (False: hit max_new_tokens)
    # the sampler's log-prob of each of `tokens` under the distribution it drew them from (temperature, top-k and
    # top-p applied; NaN where the engine gave none); None: the backend reports none
    logprobs: list[float] | None = None


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


def sample(logits: torch.Tensor, uniforms: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: [B, V] logits and [B] uniforms in [0, 1) -> [B] ids."""
    return sample_with_logprobs(logits, uniforms, params)[0]


def sample_with_logprobs(logits: torch.Tensor, uniforms: torch.Tensor,
                         params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample`, and [B] float32 log-probs of the picked ids under the distribution they were drawn from: the
    temperature-scaled, top-k/top-p filtered softmax (vLLM's `processed_logprobs`, what TRL's importance-sampling
    correction asks vLLM for). Greedy rows: the plain model's log-softmax at the argmax (vLLM's choice too)."""
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


class PreallocatedKVLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values live in buffers sized for the whole decode call.

    `update` writes the new positions in place and returns views of the filled prefix, so a decode step costs
    one small copy per layer instead of `DynamicLayer`'s concatenation of the whole cache. The rest of the
    `DynamicLayer` contract (sequence length, mask sizes, batch repeat/select) holds unchanged.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, dk = key_states.shape
        self._k = key_states.new_empty(b, h, self.capacity, dk)
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} positions)")
        self._k[:, :, self.length: end] = key_states
        self._v[:, :, self.length: end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedKVLayer is only used by the rollout decode loop, which never crops")

    def reset(self) -> None:
        self.length = 0
        super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()


def decode_cache(model: torch.nn.Module, capacity: int) -> DynamicCache:
    """A cache for one `generate` call: preallocated layers when every layer is plain full attention (what
    `DynamicCache(config=...)` would fill with `DynamicLayer`s), else transformers' own choice of layers."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedKVLayer(capacity) for _ in cache.layers]
    return cache


def _linear_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) that `module` applies as one `F.linear`: a plain `nn.Linear`, or a peft LoRA `Linear` with
    its active adapters folded in (delta = B @ A * scaling, as peft's own merge computes it). None for anything
    else (DoRA, LoRA bias or variants, quantised layers, ...), which makes the caller fall back."""
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(module, "get_delta_weight"):
        return None
    weight = base.weight
    if module.disable_adapters or module.merged:
        return weight, base.bias
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if (getattr(module, "use_dora", {}).get(name) or getattr(module, "lora_bias", {}).get(name)
                or name in getattr(module, "lora_variant", {})):
            return None
        weight = weight + module.get_delta_weight(name)
    return weight, base.bias


Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight [out, in], bias [out] or None), applied as F.linear


class PackedProjections:
    """The decode step's projections as MKL sgemm with pre-packed weights, at one row count per packing.

    A decode step multiplies a few rows (the batch) by every weight matrix once. MKL's `sgemm` repacks the weight
    operand on every call, and at 8-32 rows that repacking, not the arithmetic, is most of the time: on the AVX2
    machine of the benchmarks (one thread) the 538 MB of SmolLM2-135M's projections cost ~115 ms per step for 8
    rows as `F.linear` against ~62 ms packed, and 48 ms for one row (reading the weights once: the memory floor). So the
    weights are packed once per `generate` call (`torch.ops.mkl._mkl_reorder_linear_weight`, what torch's
    own freezing and inductor use) and applied with `torch.ops.mkl._mkl_linear`. A packing serves exactly one row
    count; as rows finish, the inputs are padded with zero rows up to it (a padded row costs little: the weights
    are read once either way), and the weights are repacked for the smaller batch once it has halved. One or two
    rows, CPUs without MKL, and other dtypes use `F.linear`. Same arithmetic, same weights: the results agree
    with `F.linear` to float rounding (~1e-6), not bitwise (MKL picks a different kernel).
    """

    MIN_ROWS = 3  # below this `F.linear` (a matrix-vector product at the memory floor) is as fast

    def __init__(self, linears: list[Linear]):
        self.linears = linears
        self.enabled = (hasattr(torch.ops, "mkl") and torch.backends.mkl.is_available()
                        and all(w.dtype == torch.float32 and w.device.type == "cpu" for w, _ in linears))
        self.rows = 0  # the row count of the current packing; 0 = not packed
        self.pack_s = 0.0  # time spent packing so far
        self._packs: dict[int, torch.Tensor] = {}  # id(weight) -> packed weight

    def prepare(self, rows: int) -> None:
        """Pack (or repack, or drop the packing) for a step of `rows` rows."""
        if not self.enabled or (self.rows and rows <= self.rows and 2 * rows > self.rows):
            return
        self._packs.clear()
        self.rows = rows if rows >= self.MIN_ROWS else 0
        if self.rows:
            t0 = time.perf_counter()
            self._packs = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, self.rows) for w, _ in self.linears}
            self.pack_s += time.perf_counter() - t0

    def linear(self, x: torch.Tensor, wb: Linear) -> torch.Tensor:
        """`F.linear(x, *wb)` for x [B, 1, in] (B <= the packed row count)."""
        weight, bias = wb
        packed = self._packs.get(id(weight)) if self.rows else None
        if packed is None:
            return torch.nn.functional.linear(x, weight, bias)
        b = x.shape[0]
        x2 = x.reshape(b, -1)
        if b < self.rows:
            x2 = torch.cat([x2, x2.new_zeros(self.rows - b, x2.shape[1])])
        return torch.ops.mkl._mkl_linear(x2, packed, weight, bias, self.rows)[:b].view(b, 1, -1)


class LlamaDecodeStep:
    """One decode step of a Llama-family decoder (`qwen2`, `llama`) computed straight from the model's modules.

    A transformers forward of one token runs ~200 small ops per layer (mask construction, module hooks, views,
    rotary helpers); at rollout batch sizes on CPU that overhead costs more than the matmuls. This step runs the
    same computation from the model's own weights and modules (norms, rotary embedding and activation), reading
    and writing the `PreallocatedKVLayer` buffers the prefill filled, with fewer and larger ops: the q, k and v
    projections as one matmul over their concatenated weights, gate and up likewise, rotary applied to q and k
    together, SDPA with the single query token's heads grouped per key/value head (transformers' `pack_gqa`
    form; SDPA's `enable_gqa` path costs ~3x more per call here), and the matmuls through `PackedProjections`.
    LoRA adapters are folded into the projection weights once per `generate` call. Results agree with the
    transformers forward to float rounding (the tests compare sampled tokens and logits). `build` returns None
    whenever the model is outside what this reproduces, and the caller then uses the model's own forward.
    """

    SUPPORTED = ("qwen2", "llama")

    def __init__(self, core: torch.nn.Module, lm_head: Linear, layers: list[dict[str, Linear]]):
        self.core, self.lm_head, self.layers = core, lm_head, layers
        self.packed = PackedProjections([*(wb for layer in layers for wb in layer.values()), lm_head])

    @classmethod
    def build(cls, model: torch.nn.Module, cache: DynamicCache) -> "LlamaDecodeStep | None":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(base, "config", None)
        core, lm_head = getattr(base, "model", None), getattr(base, "lm_head", None)
        if (config is None or core is None or lm_head is None or config.model_type not in cls.SUPPORTED
                or getattr(config, "_attn_implementation", None) != "sdpa" or base.training
                or not all(isinstance(layer, PreallocatedKVLayer) for layer in cache.layers)
                or len(cache.layers) != len(core.layers) or next(base.parameters()).device.type != "cpu"
                # under CPU autocast (`rollout_dtype`) the packed fp32 matmuls would skip the cast: the model's forward
                or torch.is_autocast_enabled("cpu")):
            return None
        layers = []
        for layer in core.layers:
            attn, mlp = layer.self_attn, layer.mlp
            names = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
                     "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
            w = {key: _linear_weights(mod) for key, mod in names.items()}
            if any(wb is None for wb in w.values()):
                return None
            layers.append({"qkv": _concat(w["q"], w["k"], w["v"]), "o": w["o"],
                           "gate_up": _concat(w["gate"], w["up"]), "down": w["down"]})
        head = _linear_weights(lm_head)
        if head is None:
            return None
        return cls(core, head, layers)

    def __call__(self, token_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
                 padding_mask: torch.Tensor | None) -> torch.Tensor:
        """token_ids, position_ids: [B, 1]; padding_mask: [B, kv] (1 = attend, kv = cache length + 1) or None when
        no row has padding. Returns [B, V] logits of the next token."""
        F = torch.nn.functional
        core, linear = self.core, self.packed.linear
        b = token_ids.shape[0]
        self.packed.prepare(b)
        hidden = core.embed_tokens(token_ids)  # [B, 1, H]
        cos, sin = core.rotary_emb(hidden, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D], as apply_rotary_pos_emb
        mask = None if padding_mask is None else padding_mask.bool()[:, None, None, :]
        for layer, w, kv in zip(core.layers, self.layers, cache.layers):
            attn = layer.self_attn
            d, groups = attn.head_dim, attn.num_key_value_groups
            x = _rms_norm(layer.input_layernorm, hidden)
            qkv = linear(x, w["qkv"]).view(b, -1, d)  # [B, q heads + 2 x kv heads, D]
            kv_heads = qkv.shape[1] // (groups + 2)
            qk = qkv[:, : (groups + 1) * kv_heads].unsqueeze(2)  # [B, q + k heads, 1, D]
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk[:, : groups * kv_heads], qk[:, groups * kv_heads:]
            keys, values = kv.update(k, qkv[:, (groups + 1) * kv_heads:].unsqueeze(2))
            # the query token's heads grouped per key/value head: [B, kv heads, groups, D] against [B, kv, T, D]
            out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, groups, d), keys, values, attn_mask=mask,
                                                 scale=attn.scaling)
            hidden = hidden + linear(out.reshape(b, 1, -1), w["o"])
            gate, up = linear(_rms_norm(layer.post_attention_layernorm, hidden), w["gate_up"]).chunk(2, dim=-1)
            hidden = hidden + linear(layer.mlp.act_fn(gate) * up, w["down"])
        return linear(_rms_norm(core.norm, hidden), self.lm_head)[:, -1, :]


def _concat(*linears: Linear) -> Linear:
    """Linear layers over the same input as one: weights (and biases, zeros where a layer has none) stacked."""
    weight = torch.cat([w for w, _ in linears])
    if all(bias is None for _, bias in linears):
        return weight, None
    return weight, torch.cat([bias if bias is not None else w.new_zeros(w.shape[0]) for w, bias in linears])


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for transformers' Llama/Qwen2 RMSNorm as one fused op (fp32: the same formula, and bitwise the same
    result on the CPUs tested); any other norm, or another dtype, through the module itself."""
    if x.dtype == torch.float32 and type(norm).__name__ in ("Qwen2RMSNorm", "LlamaRMSNorm"):
        return torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
    if num_samples > 1:  # one prefill per prompt, shared by its samples
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
    t_decode = time.perf_counter()
    row_steps = 0
    padded = bool((mask == 0).any())  # no padding: the step runs unmasked attention, as transformers does
    step = LlamaDecodeStep.build(model, cache) if steps > 1 else None
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
