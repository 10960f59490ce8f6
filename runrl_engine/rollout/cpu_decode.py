"""The CPU decode step for Llama-family models: one token per row, computed straight from the model's modules.

What it covers: the decode steps after the prefill (one new token per row against the cache the prefill filled)
of `qwen2` and `llama` models (`LlamaDecodeStep.SUPPORTED`: the builtin models are `qwen2`, SmolLM2 is `llama`)
with SDPA attention, in eval mode, on CPU, outside autocast, whose cache is made of `PreallocatedKVLayer`s, or of
`SharedPromptKVLayer`s where `prompt_sharing_pays` (each prompt's keys and values once for all its samples;
`rollout/kv_cache.py`). Plain peft LoRA adapters are folded into the projection weights when the step is built.
With float32 weights on a CPU the projections run on pre-packed weights (MKL's or oneDNN's, whichever is faster
here: `PackedProjections`); other dtypes, and calls that start with one or two rows, use `F.linear`. It
computes what the transformers forward computes, to float rounding (the packed kernels round differently from
`F.linear`'s): tests/engine/test_rollout.py compares the sampled tokens of both paths token for token, and one
step's logits with a full forward's.

Used by the rollout loop (`rollout/hf.py`'s `generate`, one step object per call) and serving's batcher
(`serving.py`) whenever `LlamaDecodeStep.build` returns a step. `build` returns None, and the caller uses the
model's own forward, for everything it does not cover: other architectures, GPUs (untested there), CPU autocast
(`rollout_dtype: bfloat16`: the packed fp32 matmuls would skip the cast), training mode, attention other than
SDPA, caches of transformers' own layers (sliding-window, chunked, shared-KV models), and adapters it cannot fold
(DoRA, LoRA bias or variants, quantised layers). The prefill always runs through the model's forward.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import torch
from transformers.cache_utils import DynamicCache

from runrl_engine.rollout.kv_cache import PreallocatedKVLayer, SharedPromptKVLayer

__all__ = ["LlamaDecodeStep", "PackedProjections", "PackedKernel", "KERNELS", "packed_kernel", "Linear",
           "prompt_sharing_pays"]


Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight [out, in], bias [out] or None), applied as F.linear


def _linear_weights(module: torch.nn.Module) -> Linear | None:
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


class PackedKernel(NamedTuple):
    """A CPU library's pre-packed fp32 linear: `pack(weight, rows)` once, then `apply(x [b, in], packed, weight,
    bias, b)` for any b up to `rows`."""

    name: str
    pack: Callable[[torch.Tensor, int], torch.Tensor]
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor]


KERNELS = (
    # MKL's sgemm on its packed operand: what torch's freezing and inductor use; the faster one on Intel CPUs
    PackedKernel("mkl", lambda w, rows: torch.ops.mkl._mkl_reorder_linear_weight(w, rows),
                 lambda x, packed, w, bias, b: torch.ops.mkl._mkl_linear(x, packed, w, bias, b)),
    # oneDNN's reordered weight: vendor-neutral kernels, ~1.8x MKL's speed at decode shapes on an AMD EPYC (AVX2),
    # where MKL runs a generic code path (and slower than MKL on an Intel Xeon)
    PackedKernel("onednn", lambda w, rows: torch.ops.mkldnn._reorder_linear_weight(w, rows),
                 lambda x, packed, w, bias, b: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")),
)


class PackedProjections:
    """The decode step's projections as a CPU library's linear on pre-packed weights.

    A decode step multiplies a few rows (the batch) by every weight matrix once. MKL's `sgemm` repacks the weight
    operand on every call, and at 8-32 rows that repacking, not the arithmetic, is most of a step once the weights
    are far larger than the caches (SmolLM2-135M's projections: 538 MB in fp32; at builtin:small's 16 MB packing
    gains nothing; benchmarks/README.md has the measurements). So the weights are packed once per `generate` call
    and applied with that library's packed linear (`KERNELS`: MKL's, what torch's own freezing and inductor use,
    or oneDNN's). Which library is faster depends on the CPU (MKL on an Intel Xeon, oneDNN on an AMD EPYC), so for
    weights larger than `CALIBRATE_MIN_BYTES` the kernel is picked by timing both once per process
    (`packed_kernel`); for smaller ones, where it makes no difference, MKL's. One packing serves every row count up
    to the one it was packed for: the packed operand does not depend on the other matrix's rows, and as rows
    finish the same packing runs at least as fast as a repacking or `F.linear` (measured with MKL at 8 -> 4, 2, 1
    rows). `_reuse_holds` checks that once per process and kernel on a small matrix; a kernel where it does not
    hold (another build), or that this build lacks, is not used; with none left, or weights that are not fp32, or
    a first step of fewer than `MIN_ROWS` rows, the step uses `F.linear`. Same arithmetic, same weights: the
    results agree with `F.linear` to float rounding (~1e-6), not bitwise (the libraries pick other kernels).
    """

    MIN_ROWS = 3  # below this `F.linear` (a matrix-vector product at the memory floor) is as fast as packing pays
    CALIBRATE_MIN_BYTES = 64 << 20  # weights far beyond the caches: where the packed kernel's speed is the step's

    def __init__(self, linears: list[Linear]):
        self.linears = linears
        fp32_cpu = all(w.dtype == torch.float32 and w.device.type == "cpu" for w, _ in linears)
        self.kernel = packed_kernel(sum(w.numel() * 4 for w, _ in linears)) if fp32_cpu else None
        self.enabled = self.kernel is not None
        self.rows = 0  # the row count of the packing; 0 = not packed
        self.pack_s = 0.0  # time spent packing
        self._packs: dict[int, torch.Tensor] = {}  # id(weight) -> packed weight

    def prepare(self, rows: int) -> None:
        """Pack for steps of up to `rows` rows, unless a packing for at least that many is in place (or too few
        rows for packing to pay)."""
        if not self.enabled or rows <= self.rows or rows < self.MIN_ROWS:
            return
        self._packs.clear()  # a repacking (serving's batch grew) never holds two packings at once
        t0 = time.perf_counter()
        self._packs = {id(w): self.kernel.pack(w, rows) for w, _ in self.linears}
        self.rows = rows
        self.pack_s += time.perf_counter() - t0

    def linear(self, x: torch.Tensor, wb: Linear) -> torch.Tensor:
        """`F.linear(x, *wb)` for x [B, 1, in] (B <= the packed row count)."""
        weight, bias = wb
        packed = self._packs.get(id(weight)) if self.rows else None
        if packed is None:
            return torch.nn.functional.linear(x, weight, bias)
        b = x.shape[0]
        return self.kernel.apply(x.reshape(b, -1), packed, weight, bias, b).view(b, 1, -1)


_REUSE: dict[str, bool] = {}  # kernel name -> the answer of `_reuse_holds`, once computed
_FASTEST: list[PackedKernel] = []  # the kernel `_fastest` measured, once per process


def packed_kernel(weight_bytes: int) -> PackedKernel | None:
    """The packed kernel for fp32 CPU weights of `weight_bytes` in all: None where no kernel serves smaller row
    counts from one packing; MKL's (else the other) for small weights; the faster one, measured once per process
    (~0.4 s on 2 cores), for large ones."""
    usable = [k for k in KERNELS if _reuse_holds(k)]
    if len(usable) < 2 or weight_bytes < PackedProjections.CALIBRATE_MIN_BYTES:
        return usable[0] if usable else None
    if not _FASTEST:
        _FASTEST.append(_fastest(usable))
    return _FASTEST[0]


PICK_MARGIN = 1.25  # another kernel replaces the first only when this much faster: the same pick run after run


def _fastest(kernels: list[PackedKernel], rows: int = 8, repeats: int = 3) -> PackedKernel:
    """The kernel with the shortest time for `rows` rows through ~85 MB of decode-shaped weights (beyond the
    last-level cache, as a real model's are), the kernels alternated and each one's best pass kept. The first
    kernel stays unless another is `PICK_MARGIN` times faster, so that a noisy measurement cannot make runs of one
    seed on one machine sample with kernels that round differently."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(3072, 576, generator=gen) for _ in range(12)]
    x = torch.randn(rows, 576, generator=gen)
    best = {k.name: float("inf") for k in kernels}
    packs = {k.name: [k.pack(w, rows) for w in weights] for k in kernels}
    for _ in range(repeats):
        for k in kernels:
            t0 = time.perf_counter()
            for w, packed in zip(weights, packs[k.name]):
                k.apply(x, packed, w, None, rows)
            best[k.name] = min(best[k.name], time.perf_counter() - t0)
    return _pick(kernels, best)


def _pick(kernels: list[PackedKernel], seconds: dict[str, float]) -> PackedKernel:
    """The kernel of fewest `seconds`, where that is `PICK_MARGIN` times fewer than the first kernel's."""
    fastest = min(kernels, key=lambda k: seconds[k.name])
    return fastest if seconds[fastest.name] * PICK_MARGIN < seconds[kernels[0].name] else kernels[0]


def _reuse_holds(kernel: PackedKernel) -> bool:
    """Whether `kernel`, with a weight packed for 8 rows, gives `F.linear`'s result for 8, 5 and 1 rows here."""
    if kernel.name not in _REUSE:
        try:
            gen = torch.Generator().manual_seed(0)
            w, bias = torch.randn(48, 40, generator=gen), torch.randn(48, generator=gen)
            packed = kernel.pack(w, 8)
            xs = [torch.randn(rows, 40, generator=gen) for rows in (8, 5, 1)]
            _REUSE[kernel.name] = all(torch.allclose(kernel.apply(x, packed, w, bias, len(x)),
                                                     torch.nn.functional.linear(x, w, bias), rtol=1e-4, atol=1e-4)
                                      for x in xs)
        except (RuntimeError, AttributeError, NotImplementedError):  # an op or a backend missing from this build
            _REUSE[kernel.name] = False
    return _REUSE[kernel.name]


class LlamaDecodeStep:
    """One decode step of a Llama-family decoder (`qwen2`, `llama`) computed straight from the model's modules.

    A transformers forward of one token runs ~200 small ops per layer (mask construction, module hooks, views,
    rotary helpers); at rollout batch sizes on CPU that overhead costs more than the matmuls. This step runs the
    same computation from the model's own weights and modules (norms, rotary embedding and activation), reading and
    writing the `PreallocatedKVLayer` buffers the prefill filled, with fewer and larger ops: the q, k and v
    projections as one matmul over their concatenated weights, gate and up likewise, rotary applied to q and k
    together, SDPA with the single query token's heads grouped per key/value head (transformers' `pack_gqa` form,
    cheaper per call than SDPA's `enable_gqa` path for one query token), and the matmuls through
    `PackedProjections`. LoRA adapters are folded into the projection weights when the step is built. Results agree
    with the transformers forward to float rounding (the tests compare sampled tokens and logits). `build` returns
    None whenever the model is outside what this reproduces, and the caller then uses the model's own forward.
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
                or not (all(type(layer) is PreallocatedKVLayer for layer in cache.layers)
                        or all(type(layer) is SharedPromptKVLayer for layer in cache.layers))
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
        """token_ids, position_ids: [B, 1]; padding_mask: [B, kv] (1 = attend, kv = cache length + 1; unused with
        `SharedPromptKVLayer`s, which hold their prompts' padding themselves) or None when
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
            q = q.reshape(b, kv_heads, groups, d)
            if type(kv) is SharedPromptKVLayer:
                out = _shared_prompt_attention(q, kv, attn.scaling)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + linear(out.reshape(b, 1, -1), w["o"])
            gate, up = linear(_rms_norm(layer.post_attention_layernorm, hidden), w["gate_up"]).chunk(2, dim=-1)
            hidden = hidden + linear(layer.mlp.act_fn(gate) * up, w["down"])
        return linear(_rms_norm(core.norm, hidden), self.lm_head)[:, -1, :]


# Prompt key/value bytes a decode step must save before `SharedPromptKVLayer` pays for its extra ops (a second
# attention call, the query layout, the merge: ~0.2 ms per layer at 8 rows here). SmolLM2-135M, 2 threads, shared
# vs repeated alternated in one process: 32 rows of 4 prompts x 227 tokens (saves 293 MB a step) decode 0.87x;
# 8 rows of one 227-token prompt (73 MB) 1.09x; 8 rows of one 39-token prompt (13 MB) 1.15x.
SHARE_MIN_SAVED_BYTES = 192 * 2**20


def prompt_sharing_pays(config, prompts: int, rows: int, prompt_width: int, element_bytes: int = 4) -> bool:
    """Whether `rows` completions of `prompts` prompts (padded to `prompt_width` tokens) decode faster with each
    prompt's keys and values held once (`SharedPromptKVLayer`) than repeated per row: the prompt bytes a step no
    longer reads, (rows - prompts) x width x key/value bytes per token over all layers (`element_bytes` per
    value), reach
    SHARE_MIN_SAVED_BYTES (SmolLM2-135M: 46 KB per token; W4's 32 rows of 4 prompts x ~230 tokens save ~290 MB
    a step and share, 8 rows of one prompt do not)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        layers, heads = text.num_hidden_layers, text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    except AttributeError:
        return False
    per_token = layers * 2 * kv_heads * head_dim * element_bytes
    return (rows - prompts) * prompt_width * per_token >= SHARE_MIN_SAVED_BYTES


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default  # (output, logsumexp)


def _shared_prompt_attention(q: torch.Tensor, kv: SharedPromptKVLayer, scale: float) -> torch.Tensor:
    """Attention of each row's query heads q [B, kv heads, groups, D] over its prompt's positions (held once per
    prompt in `kv`) and its own completion positions (`kv.keys`/`kv.values`), as one softmax over both: each part
    attended separately, the two outputs weighted by their shares of the total exp-sum, from each part's
    log-sum-exp (share of the prompt = sigmoid(lse_prompt - lse_completion)). The prompt part runs as one call per
    layer over every prompt, its queries laid out [U, kv heads, samples x groups, D] (a finished row's slot
    computes on zeros and is not read)."""
    b, h, g, d = q.shape
    u, samples = kv.prompt_keys.shape[0], kv.samples
    slots = kv.slots  # each row's place in the [U x samples] layout; None while every row is in its own place
    if slots is None:
        queries = q.view(u, samples, h, g, d)
    else:
        queries = q.new_zeros(u * samples, h, g, d).index_copy_(0, slots, q).view(u, samples, h, g, d)
    queries = queries.permute(0, 2, 1, 3, 4).reshape(u, h, samples * g, d)
    out_p, lse_p = _FLASH(queries, kv.prompt_keys, kv.prompt_values, attn_mask=kv.prompt_bias, scale=scale)
    out_p = out_p.view(u, h, samples, g, d).permute(0, 2, 1, 3, 4).reshape(u * samples, h, g, d)
    lse_p = lse_p.view(u, h, samples, g).permute(0, 2, 1, 3).reshape(u * samples, h, g)
    if slots is not None:
        out_p, lse_p = out_p.index_select(0, slots), lse_p.index_select(0, slots)
    out_c, lse_c = _FLASH(q, kv.keys, kv.values, scale=scale)
    return torch.lerp(out_c, out_p, torch.sigmoid(lse_p - lse_c).unsqueeze(-1))


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
