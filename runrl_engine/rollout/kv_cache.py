"""The key/value cache our decode loops use: one buffer per layer, sized for the whole call.

transformers' `DynamicLayer` concatenates the whole cache with each new token; `PreallocatedKVLayer` writes each
token in place into a buffer allocated once (prompt + `max_new_tokens` positions), so a decode step costs one
small copy per layer whatever the context length. `decode_cache` builds a cache of such layers for a model whose
layers are all plain full attention. Used by the rollout loop (`rollout/hf.py`), the CPU decode step that reads
and writes these buffers directly (`rollout/cpu_decode.py`), and serving's batcher (`serving.py`), which grows and
merges them as requests join.

Not covered: sliding-window, chunked or shared-KV layers (`decode_cache` keeps transformers' own layers for
those), cropping (speculative decoding, which nothing here does).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["PreallocatedKVLayer", "decode_cache"]


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
