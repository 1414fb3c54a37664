"""The fusion driver's KV sources: where a request's chunk KV comes from (DESIGN §5).

    source = make_source(store, lm)                  # TieredSource on CUDA, HostSource on the CPU
    source.submit("req-1", store, [prefix_id, *chunk_ids])   # enqueued: prefetch starts now
    result = source.fuse(lm, "req-1", question_ids, selector="kvfuse", ratio=0.15)
    source.cancel("req-2")                            # dropped from the queue, reads not started are dropped

Every path that fuses (the engine, `kvfuse ask`, `kvfuse eval`, `kvfuse bench ttft|serve`) goes
through a source's `fuse`, so the benchmarks measure what a host server runs.

Both hand their KV to the one fusion driver (`fusion.prepare_from` + `fusion.run`: select,
recompute, Cache); they differ only in how the KV arrives:

- `HostSource`: chunks memory-mapped from the store and copied to the model's device, all at
  once (`fusion.HostKV`; the CPU path).
- `TieredSource`: store -> pinned host pool -> GPU pool with queue-driven prefetch and look-ahead
  eviction (`loader.tiers.Tiers`), layer-wise copies on CUDA side streams overlapped with the
  recompute (`layerwise.LayerwiseLoad`); a chunk in neither pool is loaded or recomputed, as the
  cold-load plan (`coldplan`) finds cheaper by the rates it measured (`TieredSource.rates`).

A request names the store (release) it reads, so after a hot reload in-flight requests finish on
the release they started with while new ones read the new one; chunk ids are content hashes, so a
chunk pooled from one release is the same bytes in the next.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from kvfuse.loader.store import Store

from .fusion import FusionResult, fuse
from .model import LoadedModel


@dataclass
class SourceStats:
    """Counters since the source was made (exported by the server's /metrics)."""

    requests: int = 0
    bytes_loaded: dict = field(default_factory=lambda: {"disk": 0, "pinned": 0, "gpu": 0})
    hits: dict = field(default_factory=lambda: {"hot": 0, "warm": 0, "cold": 0})
    chunks_recomputed: int = 0   # chunks in no pool that the cold-load plan recomputed instead of loading

    def as_dict(self) -> dict:
        return {"requests": self.requests, "bytes_loaded": dict(self.bytes_loaded), "hits": dict(self.hits),
                "chunks_recomputed": self.chunks_recomputed}


class HostSource:
    """Chunk KV read from the store's memory-mapped shards, copied to the model's device per request."""

    def __init__(self, verify: bool = True):
        self.verify = verify
        self._requests: dict[str, tuple[Store, tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self.stats = SourceStats()

    def accepts(self, store: Store) -> bool:
        """Whether this source can serve `store`'s chunks: any KV dtype (Store.read dequantises)."""
        return True

    def submit(self, request_id: str, store: Store, chunk_ids) -> None:
        """Enqueue a request's chunks ([prefix, *chunks]) read from `store`."""
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} is already queued")
            self._requests[request_id] = (store, tuple(chunk_ids))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)

    def queued(self) -> int:
        with self._lock:
            return len(self._requests)

    def fuse(self, lm: LoadedModel, request_id: str, question_ids: torch.Tensor, selector: str = "kvfuse",
             ratio: float = 0.15) -> FusionResult:
        """Fused prefill of a submitted request; the request leaves the queue (also on error)."""
        with self._lock:
            if request_id not in self._requests:
                raise KeyError(f"request {request_id!r} is not queued; submit() it first")
            store, chunk_ids = self._requests.pop(request_id)
        prefix, *chunks = [store.read(cid, verify=self.verify) for cid in chunk_ids]
        self.stats.requests += 1
        # as stored: a quantised store's codes and scales, not the dequantised tensor read returns
        self.stats.bytes_loaded["disk"] += sum(store.stored_bytes(c.kv.shape[3]) for c in (prefix, *chunks))
        self.stats.hits["cold"] += len(chunk_ids)
        return fuse(lm, prefix, chunks, question_ids, selector, ratio)

    def retain(self, live_chunk_ids: set[str]) -> None:
        """Pools drop chunks no live release references (nothing is pooled here)."""

    def close(self) -> None:
        pass


class TieredSource:
    """store -> pinned host pool -> GPU pool, with layer-wise loading (CUDA only)."""

    def __init__(self, store: Store, lm: LoadedModel, host_bytes: int = 8 << 30, gpu_bytes: int = 4 << 30,
                 chunk_tokens: int | None = None, policy: str = "lookahead", verify: bool = False,
                 drop_page_cache: bool = False, measure_stall: bool = False, cold_plan: bool = True):
        from .coldplan import LoadRates
        from .layerwise import tiers_for

        chunk_tokens = chunk_tokens or max(r.n_tokens for r in store.records(include_prefix=True))
        self.tiers = tiers_for(store, lm.spec, host_bytes, gpu_bytes, device=lm.model.device,
                               chunk_tokens=chunk_tokens, policy=policy, verify=verify,
                               drop_page_cache=drop_page_cache)
        self.measure_stall = measure_stall   # time the compute stream's waits on copies (benchmarks)
        # chunks in neither pool: load or recompute, by these measured rates (`coldplan`; None: always load)
        self.rates = LoadRates() if cold_plan else None
        self.stats = SourceStats()

    def accepts(self, store: Store) -> bool:
        """Whether the pools, made for one KV dtype (codes + scales or the model's), hold store's chunks."""
        return store.codec == self.tiers.codec

    def submit(self, request_id: str, store: Store, chunk_ids) -> None:
        # chunk ids are content hashes: any release that holds a chunk holds the same bytes
        self.tiers.prefetcher.use_store(store)
        self.tiers.submit(request_id, chunk_ids)

    def cancel(self, request_id: str) -> None:
        self.tiers.cancel(request_id)

    def queued(self) -> int:
        return len(self.tiers.queue)

    def fuse(self, lm: LoadedModel, request_id: str, question_ids: torch.Tensor, selector: str = "kvfuse",
             ratio: float = 0.15) -> FusionResult:
        from .layerwise import fuse_layerwise

        result = fuse_layerwise(lm, self.tiers, request_id, question_ids, selector=selector, ratio=ratio,
                                measure_stall=self.measure_stall, rates=self.rates)
        t = result.timings
        self.stats.requests += 1
        self.stats.chunks_recomputed += int(t.get("recompute", 0))
        for tier in ("hot", "warm", "cold"):
            self.stats.hits[tier] += int(t.get(tier, 0))
        self.stats.bytes_loaded["pinned"] += int(t.get("h2d_bytes", 0))
        return result

    def retain(self, live_chunk_ids: set[str]) -> None:
        """Drop pooled chunks that no live release references."""
        for pool in (self.tiers.gpu, self.tiers.host):
            for cid in pool.resident():
                if cid not in live_chunk_ids:
                    pool.evict(cid)

    def close(self) -> None:
        self.tiers.close()


def make_source(store: Store, lm: LoadedModel, kind: str = "auto", verify: bool = True,
                host_bytes: int | None = None, gpu_bytes: int | None = None, **tiered):
    """kind "auto": TieredSource when the model runs on CUDA, else HostSource; or "host" / "tiered".
    tiered: TieredSource's options (policy, chunk_tokens, drop_page_cache, measure_stall, cold_plan)."""
    if kind not in ("auto", "host", "tiered"):
        raise ValueError(f"unknown KV source {kind!r}: choose auto, host or tiered")
    if kind == "tiered" or (kind == "auto" and lm.model.device.type == "cuda"):
        kw = {k: v for k, v in (("host_bytes", host_bytes), ("gpu_bytes", gpu_bytes)) if v}
        return TieredSource(store, lm, **kw, **tiered)
    return HostSource(verify=verify)
