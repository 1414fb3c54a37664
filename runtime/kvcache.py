"""Between stored KV tensors [L, 2, H_kv, T, D] and transformers' `DynamicCache`.

`ScatterLayer` is the piece that makes selective recompute work with an
unmodified transformers model: during the recompute pass, the fresh K/V of the
selected context tokens are written *into their own slots* of the fused cache
(index_copy), and only the question's K/V are appended. After the pass it
behaves as an ordinary `DynamicLayer`, so `generate` continues from it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class ScatterLayer(DynamicLayer):
    """A DynamicLayer whose next update writes its first `len(slots)` tokens into `slots`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values  # [1, H_kv, N, D]
        self.slots: torch.Tensor | None = None  # [S] int64 cache indices to overwrite

    def update(self, key_states, value_states, *args, **kwargs):
        if self.slots is None or self.slots.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        s = self.slots.numel()
        # key_states: [1, H_kv, S + Q, D]; the first S are the selected context tokens.
        self.keys.index_copy_(2, self.slots, key_states[:, :, :s])
        self.values.index_copy_(2, self.slots, value_states[:, :, :s])
        self.slots = None  # one pass only; later updates (the question, decoding) append
        return super().update(key_states[:, :, s:], value_states[:, :, s:], *args, **kwargs)


def cache_from_kv(kv: torch.Tensor, slots: torch.Tensor | None = None) -> DynamicCache:
    """A DynamicCache holding kv [L, 2, H_kv, N, D] (copied, so the caller's tensor is untouched)."""
    cache = DynamicCache()
    cache.layers = []
    for l in range(kv.shape[0]):
        layer = ScatterLayer(kv[l, 0].unsqueeze(0).clone(), kv[l, 1].unsqueeze(0).clone())
        layer.slots = slots
        cache.layers.append(layer)
    return cache


def kv_from_cache(cache: DynamicCache, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Stack a cache's K/V for positions [start, end) into [L, 2, H_kv, T, D]."""
    return torch.stack(
        [torch.stack((layer.keys[0, :, start:end], layer.values[0, :, start:end])) for layer in cache.layers]
    )
