"""The serve-time tiers a request's chunk KV moves through (DESIGN §5).

    tiers = Tiers(store, kv_shape=(L, H_kv, D), dtype=torch.bfloat16, host_bytes=16 << 30,
                  gpu_bytes=8 << 30, device="cuda")
    tiers.submit("req-1", [prefix_id, *chunk_ids])   # prefetch disk -> pinned starts now
    pairs, counts = tiers.acquire("req-1")           # [(GPU slot, pinned entry or None)], hot/warm/cold
    ...                                              # the runtime copies pinned -> GPU slot, layer by layer
    tiers.release("req-1", pairs)

Shard files (read with pread, never mmap -> GPU) -> a pinned host pool -> a GPU
pool. A chunk found in the GPU pool is *hot*, in the pinned pool *warm*,
otherwise *cold* (read from disk first). Every chunk of a request gets a GPU
slot; warm and cold chunks come with the pinned entry their bytes are copied
from (`kvfuse.runtime.layerwise.LayerwiseLoad` issues those copies on the side
streams held here).

Takes the model's KV geometry as plain shapes and a dtype: the loader imports no runtime.
A quantised store's pools hold its codes and scales as stored (half of bf16's bytes for
fp8: the bandwidth win is in every tier); the runtime dequantises them in its GPU gather
(`kvfuse.loader.quant.dequantize_`). `tiers.dtype` is the model's dtype, the fused KV's.
"""

from __future__ import annotations

import torch

from .pool import KVPool, PoolEntry
from .prefetch import Prefetcher
from .store import Store


class Tiers:
    """Shard files -> pinned host pool -> GPU pool, with queue-driven prefetch into the pinned pool.

    kv_shape: (n_layers, n_kv_heads, head_dim) of the model whose KV the store holds; pools
    hold chunks of at most `chunk_tokens` tokens. Raises PoolCapacityError if a pool holds no
    chunk at all.
    """

    def __init__(self, store: Store, kv_shape: tuple[int, int, int], dtype: torch.dtype, host_bytes: int,
                 gpu_bytes: int, device: str | torch.device = "cuda", chunk_tokens: int = 512,
                 policy: str = "lookahead", workers: int = 8, verify: bool = False, drop_page_cache: bool = False):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        n_layers, n_kv_heads, head_dim = kv_shape
        slot = (n_layers, 2, n_kv_heads, chunk_tokens, head_dim)     # [L, 2, H_kv, T_max, D]
        self.dtype = dtype                                            # the model's: what the gather writes
        self.codec = store.codec                                      # how the pools hold it (quant.py)
        stored = self.codec.storage_dtype(dtype)
        sc = self.codec.scale_dtype if self.codec.quantised else None
        self.host = KVPool("pinned host", host_bytes, slot, stored, "cpu", pin=cuda, policy=policy, scale_dtype=sc)
        self.gpu = KVPool("GPU", gpu_bytes, slot, stored, self.device, policy=policy, scale_dtype=sc)
        self.prefetcher = Prefetcher(store, self.host, workers=workers, verify=verify,
                                     drop_page_cache=drop_page_cache)
        self.queue = self.prefetcher.queue
        # Side streams shared by every load, so the work of consecutive requests stays in order:
        # host -> GPU transfers on one, gather + re-rotation on the other.
        self.h2d_stream = torch.cuda.Stream(self.device) if cuda else None
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None

    def submit(self, request_id: str, chunk_ids) -> None:
        """Enqueue a request ([prefix, *chunks]); its cold chunks start moving to pinned memory."""
        self.prefetcher.submit(request_id, chunk_ids)

    def cancel(self, request_id: str) -> None:
        self.prefetcher.cancel(request_id)

    def acquire(self, request_id: str) -> tuple[list[tuple[PoolEntry, PoolEntry | None]], dict]:
        """Resolve a queued request's chunks to GPU slots: (pairs, counts).

        pairs[i] = (GPU entry, pinned entry or None) in the request's chunk order: None when
        the chunk was hot (its slot already holds it); otherwise the slot is fresh and the
        caller copies the pinned entry's bytes into it. Waits for disk reads still in flight.
        counts: {"hot", "warm", "cold"} chunk counts. Every entry is held until `release`.
        Raises KeyError for a request not submitted, PoolCapacityError when a pool is too small.
        """
        chunk_ids = list(self.queue.chunks(request_id) or ())
        if not chunk_ids:
            raise KeyError(f"request {request_id!r} is not queued; submit() it first")
        self.gpu.check_fits(len(chunk_ids), f"request {request_id}")
        self.host.check_fits(len(chunk_ids), f"request {request_id}")
        rank = self.queue.position(request_id)
        gpu: list[PoolEntry | None] = [self.gpu.get(cid) for cid in chunk_ids]
        missing = [cid for cid, g in zip(chunk_ids, gpu) if g is None]
        host: dict[str, PoolEntry] = {}
        try:
            counts = {"hot": len(chunk_ids) - len(missing), "warm": 0, "cold": 0}
            host = dict(zip(missing, self.prefetcher.acquire(request_id, only=missing, counts=counts)))
            next_use = self.queue.next_use()
            for i, cid in enumerate(chunk_ids):
                if gpu[i] is None:
                    h = host[cid]
                    gpu[i] = self.gpu.allocate(cid, h.n_tokens, rank, next_use)
                    gpu[i].meta = h.meta
                    self.gpu.mark_ready(gpu[i])  # filled on the copy stream; every user waits on it
        except BaseException:
            for e in [g for g in gpu if g is not None]:
                self.gpu.release(e)
            for e in host.values():
                self.host.release(e)
            raise
        return [(g, host.get(cid)) for cid, g in zip(chunk_ids, gpu)], counts

    def release(self, request_id: str, pairs: list[tuple[PoolEntry, PoolEntry | None]]) -> None:
        """The request ran: release its entries (evictable again) and take it off the queue."""
        for g, h in pairs:
            self.gpu.release(g)
            if h is not None:
                self.host.release(h)
        self.prefetcher.finish(request_id)

    def close(self) -> None:
        self.prefetcher.close()
