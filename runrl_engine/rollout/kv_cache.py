"""The key/value cache our decode loops use: one buffer per layer, sized for the whole call.

transformers' `DynamicLayer` concatenates the whole cache with each new token; `PreallocatedKVLayer` writes each
token in place into a buffer allocated once (prompt + `max_new_tokens` positions), so a decode step costs one
small copy per layer whatever the context length. `decode_cache` builds a cache of such layers for a model whose
layers are all plain full attention. Used by the rollout loop (`rollout/hf.py`), the CPU decode step that reads
and writes these buffers directly (`rollout/cpu_decode.py`), and serving's batcher (`serving.py`), which grows and
merges them as requests join. `share_prompts` turns a prefilled cache into `SharedPromptKVLayer`s, which hold each
prompt's keys and values once for all its samples; only the CPU decode step reads those (the rollout loop uses
them where `cpu_decode.prompt_sharing_pays`).

Not covered: sliding-window, chunked or shared-KV layers (`decode_cache` keeps transformers' own layers for
those), cropping (speculative decoding, which nothing here does).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["PreallocatedKVLayer", "SharedPromptKVLayer", "decode_cache", "share_prompts"]


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


class SharedPromptKVLayer(PreallocatedKVLayer):
    """A decode cache layer that holds each prompt's keys and values once, and each row's completion in its own
    preallocated buffer (the `PreallocatedKVLayer` part: `update` appends completion positions).

    G samples of one prompt read the same prompt keys and values at every decode step; repeated per row (what
    `batch_repeat_interleave` does) they are read G times, and with a ~230-token system prompt and 32 rows they
    are most of what a step reads besides the weights (SmolLM2-135M: 46 KB per token per row, 290 MB per step at
    W4's shape against 538 MB of weights). Here `prompt_keys`/`prompt_values` are the prefill's [U, h, P, d]
    (one row per prompt; `prompt_bias` [U, 1, 1, P] masks its left padding, None when there is none), `keys`/
    `values` the rows' completion positions [B, h, length, d], and `slots` [B] each row's place in the
    [U x samples] layout (prompt index x samples + sample index; None until a row is dropped: row i is in place
    i). `batch_select_indices` keeps rows without copying the prompt part; `get_seq_length` counts both parts.

    Only `LlamaDecodeStep` reads it (attention over the two parts, merged by their log-sum-exp); transformers'
    forward does not, so `share_prompts` is used only where that step runs.
    """

    def __init__(self, prompt: PreallocatedKVLayer, samples: int, capacity: int, prompt_bias: torch.Tensor | None):
        super().__init__(capacity)
        self.prompt_keys = prompt._k[:, :, : prompt.length]
        self.prompt_values = prompt._v[:, :, : prompt.length]
        self.prompt_bias, self.samples = prompt_bias, samples
        self.slots: torch.Tensor | None = None
        u, h, _, d = self.prompt_keys.shape
        self.lazy_initialization(self.prompt_keys.new_empty(u * samples, h, 0, d),
                                 self.prompt_values.new_empty(u * samples, h, 0, self.prompt_values.shape[-1]))
        self._views()

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self.slots = indices if self.slots is None else self.slots[indices]
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SharedPromptKVLayer already holds every sample's completion")


def share_prompts(cache: DynamicCache, samples: int, capacity: int, prompt_mask: torch.Tensor) -> None:
    """Turn a prefilled cache of `PreallocatedKVLayer`s (one row per prompt) into `SharedPromptKVLayer`s for
    `samples` rows per prompt with room for `capacity` completion positions; `prompt_mask` [U, P] (1 = token)."""
    bias = None
    if bool((prompt_mask == 0).any()):
        bias = torch.zeros(prompt_mask.shape, dtype=cache.layers[0]._k.dtype, device=prompt_mask.device)
        bias = bias.masked_fill(prompt_mask == 0, float("-inf"))[:, None, None, :]
    cache.layers = [SharedPromptKVLayer(layer, samples, capacity, bias) for layer in cache.layers]
