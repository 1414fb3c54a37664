"""Between stored KV tensors [L, 2, H_kv, T, D] and transformers' `DynamicCache`.

`ScatterLayer` is the piece that makes selective recompute work with an
unmodified transformers model: during the recompute pass, the fresh K/V of the
selected context tokens are written *into their own slots* of the fused cache
(index_copy), and only the question's K/V are appended. After the pass it
behaves as an ordinary `DynamicLayer`, so `generate` continues from it.

`StreamedLayer` is the same over a buffer that is still arriving layer by layer
(`layerwise.LayerwiseLoad`): its update makes the compute stream wait for its
layer's copy first, and writes the question's K/V into the buffer's tail.
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


def _append_view(keys, values, room, key_states, value_states):
    """(keys + new, values + new) along the tokens: written into `room` ([1, H_kv, N + T, D]
    buffers whose first N tokens are keys/values) when the new tokens fit, else concatenated.
    At 16k tokens a concatenation copies the whole layer's K/V (64 MB for Llama-3-8B) per pass."""
    n, q = keys.shape[-2], key_states.shape[-2]
    if room is not None and n + q <= room[0].shape[-2]:
        room[0][:, :, n:n + q] = key_states
        room[1][:, :, n:n + q] = value_states
        return room[0][:, :, :n + q], room[1][:, :, :n + q]
    return torch.cat((keys, key_states), -2), torch.cat((values, value_states), -2)


class PeekLayer(DynamicLayer):
    """A read-only layer over stored K/V [1, H_kv, N, D]: an update attends over the stored
    K/V plus the new tokens and keeps nothing (the question probe; no copy of the cache).
    room: buffers [1, H_kv, N + T, D] beginning with the stored K/V, whose tail may take the
    new tokens (scratch: what a probe writes there is overwritten by the next pass)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room=None):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.room = keys, values, room

    def update(self, key_states, value_states, *args, **kwargs):
        return _append_view(self.keys, self.values, self.room, key_states, value_states)

    @staticmethod
    def cache(kv: torch.Tensor) -> DynamicCache:
        """A probe's cache over kv [L, 2, H_kv, N, D] (views, nothing copied)."""
        cache = DynamicCache()
        cache.layers = [PeekLayer(kv[l, 0][None], kv[l, 1][None]) for l in range(kv.shape[0])]
        return cache


class RepairLayer(PeekLayer):
    """A layer over working K/V [1, H_kv, N, D] that a selection pass repairs in place.

    An update writes its first `len(slots)` tokens' fresh K/V into their slots of the
    working K/V (kept: the next pass and the final recompute read them) and attends over
    the working K/V plus the rest (the question), which it does not keep. Incremental
    staged selection (`selectors/kvfuse_staged.py`) runs its probes on it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor | None, room=None,
                 before=None):
        super().__init__(keys, values, room)
        self.slots, self.before = slots, before    # before(): e.g. make the compute stream wait for the layer

    def update(self, key_states, value_states, *args, **kwargs):
        if self.before is not None:
            self.before()
        s = 0 if self.slots is None else self.slots.numel()
        if s:  # key_states: [1, H_kv, S + Q, D]; the first S are the repaired context tokens
            self.keys.index_copy_(2, self.slots, key_states[:, :, :s])
            self.values.index_copy_(2, self.slots, value_states[:, :, :s])
        return super().update(key_states[:, :, s:], value_states[:, :, s:], *args, **kwargs)

    @staticmethod
    def cache(kv: torch.Tensor, n_stored: int, slots: torch.Tensor | None = None, wait=None) -> DynamicCache:
        """A repairing pass's cache over working kv [L, 2, H_kv, N + T, D]: the first N =
        n_stored tokens are the context's K/V (written in place), the T after them room for
        the pass's question. wait(l), if given, runs before layer l's update (a layer-wise load
        makes the compute stream wait there for layer l's copy)."""
        cache = DynamicCache()
        cache.layers = [RepairLayer(kv[l, 0, :, :n_stored][None], kv[l, 1, :, :n_stored][None], slots,
                                    room=(kv[l, 0][None], kv[l, 1][None]),
                                    before=None if wait is None else (lambda l=l: wait(l)))
                        for l in range(kv.shape[0])]
        return cache


class StreamedLayer(ScatterLayer):
    """A cache layer over fused[l] that makes the compute stream wait for layer l's copy.

    `load` is a `layerwise.LayerwiseLoad` (anything with `fused` [L, 2, H_kv, N + Q, D],
    `layout` and `wait(layer, ahead)`). The recompute pass writes the selected tokens'
    fresh K/V into their slots and the question's into the fused buffer's tail (no
    concatenation); later updates append. peek: the probe's read-only view."""

    def __init__(self, load, idx: int, peek: bool):
        n = load.layout.question_start
        self.tail = (load.fused[idx, 0][None], load.fused[idx, 1][None])         # [1, H_kv, N + Q, D]
        super().__init__(self.tail[0][:, :, :n], self.tail[1][:, :, :n])         # [1, H_kv, N, D] views
        self.load, self.idx, self.peek = load, idx, peek

    def update(self, key_states, value_states, *args, **kwargs):
        if self.load is not None:
            self.load.wait(self.idx, ahead=0 if self.peek else None)
        if self.peek:  # the probe: attend over the stored K/V plus the question (in the tail), keep nothing
            return _append_view(self.keys, self.values, self.tail, key_states, value_states)
        self.load = None  # landed; later updates (decoding) append as usual
        s = 0 if self.slots is None else self.slots.numel()
        n = self.keys.shape[-2]
        full_k, full_v = self.tail
        if self.tail[0] is None or n + key_states.shape[-2] - s != full_k.shape[-2]:
            return super().update(key_states, value_states, *args, **kwargs)
        if s:  # key_states: [1, H_kv, S + Q, D]; the first S are the selected context tokens
            self.keys.index_copy_(2, self.slots, key_states[:, :, :s])
            self.values.index_copy_(2, self.slots, value_states[:, :, :s])
        full_k[:, :, n:] = key_states[:, :, s:]
        full_v[:, :, n:] = value_states[:, :, s:]
        self.keys, self.values, self.slots, self.tail = full_k, full_v, None, (None, None)
        return self.keys, self.values


def cache_from_kv(kv: torch.Tensor, slots: torch.Tensor | None = None, batch: int = 1,
                  copy: bool = True) -> DynamicCache:
    """A DynamicCache holding kv [L, 2, H_kv, N, D] (copied, so the caller's tensor is untouched),
    for a batch of `batch` sequences that share it ([batch, H_kv, N, D] per layer).
    copy=False (batch 1): the layers are views of kv, and the pass writes its slots into kv."""
    cache = DynamicCache()
    cache.layers = []
    for l in range(kv.shape[0]):
        if not copy and batch == 1:
            k, v = kv[l, 0][None], kv[l, 1][None]
        else:
            k, v = (kv[l, i].unsqueeze(0).expand(batch, -1, -1, -1).clone() for i in (0, 1))
        layer = ScatterLayer(k, v)
        layer.slots = slots
        cache.layers.append(layer)
    return cache


def kv_from_cache(cache: DynamicCache, start: int = 0, end: int | None = None, seq: int = 0) -> torch.Tensor:
    """Stack a cache's K/V for positions [start, end) of sequence `seq` into [L, 2, H_kv, T, D]."""
    return torch.stack(
        [torch.stack((layer.keys[seq, :, start:end], layer.values[seq, :, start:end])) for layer in cache.layers]
    )
