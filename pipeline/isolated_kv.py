"""The isolated pass of an enriched build, run once instead of twice (issue 14).

An enriched build prefills each new chunk alone after the shared prefix twice:
once to embed it (relate, `embed_chunk`) and once for its kv_deviation
(`prefill_chunk`). Both passes are the same computation, so the embedding pass
keeps the chunk's KV here and the prefill takes it back:

    keep = ISOLATED_KV.configure(max_bytes=8 << 30)
    embed_chunk(lm, prefix_kv, ids, keep=keep)                 # puts [L, 2, H_kv, T, D]
    iso = keep.take(lm, prefix_ids, ids)                       # the same tensor, or None
    prefill_chunk(lm, prefix_kv, ids, neighbour_ids, isolated=iso)

Entries stay on the model's device (GPU memory on a GPU worker), one process
(one Dask worker) each, and are bounded by `max_bytes` (at most a quarter of
the RAM; on a GPU a quarter of its memory stays free): once full, later chunks
are not kept and their isolated pass simply runs again (so the output is the
same whatever the budget or the worker a task lands on; only the time differs).
The build takes each entry once, and clears what is left when it is done.
Only kept when the model attends with SDPA (kvfuse's recording attention is
SDPA), so the kept KV is bit-identical to the pass it replaces.
"""

from __future__ import annotations

import os
import threading

import torch

_SDPA = ("sdpa", "kvfuse")
GPU_RESERVE = 0.25  # fraction of the GPU's memory always left free for the prefill


class IsolatedKV:
    """chunk tokens (for one model and prefix) -> isolated KV [L, 2, H_kv, T, D], at most max_bytes."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self._kv: dict[tuple, torch.Tensor] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def configure(self, max_bytes: int) -> "IsolatedKV":
        """Set the budget: max_bytes, and never more than a quarter of this machine's RAM."""
        try:
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            ram = max_bytes * 4
        self.max_bytes = min(max_bytes, ram // 4)
        return self

    def accepts(self, lm) -> bool:
        return self.max_bytes > 0 and lm.model.config._attn_implementation in _SDPA

    @staticmethod
    def _key(lm, prefix_ids, chunk_ids) -> tuple:
        return (lm.spec.fingerprint, str(lm.model.dtype), str(lm.model.device), tuple(int(t) for t in prefix_ids),
                tuple(int(t) for t in chunk_ids))

    def put(self, lm, prefix_ids, chunk_ids, kv: torch.Tensor) -> bool:
        """Keep kv [L, 2, H_kv, T, D] if it fits; returns whether it was kept."""
        size = kv.numel() * kv.element_size()
        if kv.is_cuda:  # a full GPU would slow (or stop) the prefill that follows: keep a reserve
            free, total = torch.cuda.mem_get_info(kv.device)
            if free - size < GPU_RESERVE * total:
                return False
        with self._lock:
            if self._bytes + size > self.max_bytes:
                return False
            key = self._key(lm, prefix_ids, chunk_ids)
            old = self._kv.pop(key, None)
            self._bytes += size - (0 if old is None else old.numel() * old.element_size())
            self._kv[key] = kv
            return True

    def take(self, lm, prefix_ids, chunk_ids) -> torch.Tensor | None:
        """The kept KV of this chunk (removed from here), or None."""
        with self._lock:
            kv = self._kv.pop(self._key(lm, prefix_ids, chunk_ids), None)
            if kv is not None:
                self._bytes -= kv.numel() * kv.element_size()
            return kv

    def clear(self) -> None:
        with self._lock:
            self._kv, self._bytes = {}, 0

    def __len__(self) -> int:
        return len(self._kv)

    @property
    def bytes(self) -> int:
        return self._bytes


ISOLATED_KV = IsolatedKV()  # this process's (a Dask worker's): filled by embedding, emptied by precompute
