"""The serve-time tiers a request's chunk KV moves through (DESIGN §5).

    tiers = Tiers(store, kv_shape=(L, H_kv, D), dtype=torch.bfloat16, host_bytes=16 << 30,
                  gpu_bytes=8 << 30, device="cuda")
    tiers.submit("req-1", [prefix_id, *chunk_ids])   # prefetch disk -> pinned starts now
    pairs, counts = tiers.acquire("req-1")           # [(GPU slot, pinned entry or None)], hot/warm/cold
    # or tiers.acquire("req-1", recompute={chunk ids}): those get no slot (the runtime recomputes them)
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

from concurrent.futures import ThreadPoolExecutor

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
        sc = dict(scale_dtype=self.codec.scale_dtype if self.codec.quantised else None,
                  scale_key_cols=self.codec.key_cols)
        self.host = KVPool("pinned host", host_bytes, slot, stored, "cpu", pin=cuda, policy=policy, **sc)
        self.gpu = KVPool("GPU", gpu_bytes, slot, stored, self.device, policy=policy, **sc)
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

    def chunk_states(self, request_id: str) -> list[tuple[str, int, int]]:
        """[(state, n_tokens, nbytes)] of a queued request's chunks ([prefix, *chunks]), now:
        "hot" (GPU pool), "warm" (pinned), "reading" (a disk read running) or "cold" (on disk,
        no read started). What the cold-load plan (`kvfuse.runtime.coldplan`) decides on.
        Raises KeyError for a request not submitted."""
        chunk_ids = list(self.queue.chunks(request_id) or ())
        if not chunk_ids:
            raise KeyError(f"request {request_id!r} is not queued; submit() it first")
        L, _, H, _, D = self.gpu.slot_shape
        out = []
        for cid in chunk_ids:
            n = self.prefetcher.store.record(cid).n_tokens
            state = "hot" if cid in self.gpu else self.prefetcher.state(cid)
            out.append((state, n, self.codec.chunk_bytes(L, H, D, self.dtype, n)))
        return out

    def acquire(self, request_id: str, recompute=()) -> tuple[list[tuple[PoolEntry, PoolEntry | None]], dict]:
        """Resolve a queued request's chunks to GPU slots: (pairs, counts).

        pairs[i] = (GPU entry, pinned entry or None) in the request's chunk order: None when
        the chunk was hot (its slot already holds it); otherwise the slot is fresh and the
        caller copies the pinned entry's bytes into it. Waits for disk reads still in flight.
        recompute: chunk ids not to load, even when pooled (the caller recomputes their tokens): they
        get a slotless entry (kv None, meta read from the shard: tokens, saliency, pos_base)
        and no pinned entry, and their prefetch reads not yet started are cancelled (the prefix
        too: then the caller provides the K/V of the prefix, e.g. prefilled from its tokens).
        counts: {"hot", "warm", "cold", "recompute"} chunk counts. Every entry is held until
        `release`. Raises KeyError for a request not submitted, PoolCapacityError when a pool
        is too small.
        """
        chunk_ids = list(self.queue.chunks(request_id) or ())
        if not chunk_ids:
            raise KeyError(f"request {request_id!r} is not queued; submit() it first")
        self.gpu.check_fits(len(chunk_ids), f"request {request_id}")
        self.host.check_fits(len(chunk_ids), f"request {request_id}")
        rank = self.queue.position(request_id)
        skip = set(recompute) & set(chunk_ids)
        gpu: list[PoolEntry | None] = [None if cid in skip else self.gpu.get(cid) for cid in chunk_ids]
        self.prefetcher.skip(request_id, skip)
        metas = self.read_metas(skip)
        missing = [cid for cid, g in zip(chunk_ids, gpu) if g is None and cid not in skip]
        host: dict[str, PoolEntry] = {}
        try:
            counts = {"hot": len(chunk_ids) - len(missing) - len(skip), "warm": 0, "cold": 0, "recompute": len(skip)}
            host = dict(zip(missing, self.prefetcher.acquire(request_id, only=missing, counts=counts)))
            next_use = self.queue.next_use()
            for i, cid in enumerate(chunk_ids):
                if cid in skip:
                    rec = self.prefetcher.store.record(cid)
                    gpu[i] = PoolEntry(cid, -1, rec.n_tokens, 0, None, meta=metas[cid])
                elif gpu[i] is None:
                    h = host[cid]
                    gpu[i] = self.gpu.allocate(cid, h.n_tokens, rank, next_use)
                    gpu[i].meta = h.meta
                    self.gpu.mark_ready(gpu[i])  # filled on the copy stream; every user waits on it
        except BaseException:
            for e in [g for g in gpu if g is not None and g.slot >= 0]:
                self.gpu.release(e)
            for e in host.values():
                self.host.release(e)
            raise
        return [(g, host.get(cid)) for cid, g in zip(chunk_ids, gpu)], counts

    def read_metas(self, chunk_ids) -> dict[str, dict]:
        """chunk id -> its tokens, saliency and pos_base, read from the shards (not the KV) on a
        small thread pool of its own (the prefetcher's threads may all be busy reading KV)."""
        ids = list(dict.fromkeys(chunk_ids))
        if not ids:
            return {}
        with ThreadPoolExecutor(min(8, len(ids))) as pool:
            return dict(zip(ids, pool.map(self.prefetcher.reader.read_meta, ids)))

    def release(self, request_id: str, pairs: list[tuple[PoolEntry, PoolEntry | None]]) -> None:
        """The request ran: release its entries (evictable again) and take it off the queue."""
        self.release_entries(pairs)
        self.prefetcher.finish(request_id)

    def release_entries(self, pairs: list[tuple[PoolEntry, PoolEntry | None]]) -> None:
        """Release entries of `acquire` (evictable again); entries without a slot hold nothing."""
        for g, h in pairs:
            if g.slot >= 0:   # a recomputed chunk's entry holds no slot
                self.gpu.release(g)
            if h is not None:
                self.host.release(h)

    def close(self) -> None:
        self.prefetcher.close()
