"""Fixed-size KV pools: the pinned host tier and the GPU tier (DESIGN §5).

    pool = KVPool("gpu", 8 << 30, slot_shape=(L, 2, H_kv, 512, D), dtype=torch.bfloat16, device="cuda")
    entry = pool.get(chunk_id)                      # a hit (acquired) or None (a miss)
    entry = pool.allocate(chunk_id, n_tokens, rank=0, next_use=queue.next_use())
    entry.kv                                        # [L, 2, H_kv, T, D] view of the entry's slot
    pool.release(entry)                             # evictable again

A pool is one tensor allocated once (pinned for the host tier) and cut into
slots of one chunk of at most `slot_shape[3]` tokens each, so serving never
allocates: a chunk's bytes land in its slot exactly as they lie in the shard
(layer-major), and layer l of a chunk is one contiguous slice of its slot.
A pool of quantised KV (dtype the codes', fp8 or int8; `scale_dtype` given) has a
second arena beside it for the chunks' scales (`loader/quant.py`),
layer-major too: `entry.scales[l]` is layer l's [H_kv, W] block (W = key_cols * D + T).

Eviction picks among entries nobody holds (`refs == 0`). The policy decides:

* `lru`: the least recently used.
* `lookahead` (PCR): a chunk no queued request needs goes first (least recently
  used among those); otherwise the one whose next use is furthest, but never
  one needed at or before the queue position `rank` of the request asking for
  room. So a prefetch for a later request never pushes out a chunk of an
  earlier one; only the running request (rank 0) may take the slot of a chunk
  that a queued request needs, when nothing else is left.

`next_use` maps chunk id -> the queue position of the first request needing it
(0 = the running request); `RequestQueue.next_use()` in `prefetch.py` makes it.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .errors import StoreError


class PoolCapacityError(StoreError):
    """A request needs more of a pool than it has: make the pool larger or the request smaller."""


class PoolFullError(StoreError):
    """No slot can be freed now: every resident chunk is in use or protected by the look-ahead policy."""


@dataclass
class PoolStats:
    slots: int
    slot_bytes: int
    used_bytes: int = 0      # bytes of the chunks resident now (not slots x slot_bytes)
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_filled: int = 0    # bytes written into the pool so far

    @property
    def capacity_bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict:
        return {"slots": self.slots, "slot_bytes": self.slot_bytes, "capacity_bytes": self.capacity_bytes,
                "used_bytes": self.used_bytes, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hit_rate, "evictions": self.evictions, "bytes_filled": self.bytes_filled}


@dataclass(eq=False)
class PoolEntry:
    chunk_id: str
    slot: int
    n_tokens: int
    nbytes: int
    kv: torch.Tensor | None           # [L, 2, H_kv, T, D] view of the slot (model dtype, or quantised codes);
                                      # None: no slot (a chunk the cold plan recomputes)
    scales: torch.Tensor | None = None  # [L, H_kv, W] view of the scale slot (quantised pools: bfloat16)
    refs: int = 0                     # holders; evictable only at 0
    ready: threading.Event = field(default_factory=threading.Event)  # set once the bytes are in
    failed: BaseException | None = None  # set with ready when filling failed
    meta: dict = field(default_factory=dict)  # tokens, saliency, pos_base (host-side, small)


def victim_lru(candidates: list[str], next_use: Mapping[str, int], rank: int) -> str | None:
    """candidates: evictable chunk ids, least recently used first."""
    return candidates[0] if candidates else None


def victim_lookahead(candidates: list[str], next_use: Mapping[str, int], rank: int) -> str | None:
    unneeded = [c for c in candidates if c not in next_use]
    if unneeded:
        return unneeded[0]
    later = [c for c in candidates if next_use[c] > rank]
    return max(later, key=lambda c: next_use[c]) if later else None


POLICIES = {"lru": victim_lru, "lookahead": victim_lookahead}


class KVPool:
    """A fixed number of chunk-sized slots on one device, with accounting and an eviction policy."""

    def __init__(self, name: str, capacity_bytes: int, slot_shape: tuple[int, int, int, int, int],
                 dtype: torch.dtype, device: str | torch.device = "cpu", pin: bool = False,
                 policy: str = "lookahead", scale_dtype: torch.dtype | None = None, scale_key_cols: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.name = name
        self.slot_shape = tuple(slot_shape)               # (L, 2, H_kv, T_max, D)
        self.dtype = dtype
        self.policy = policy
        slot_numel = math.prod(self.slot_shape)
        L, _, H, T_max, D = self.slot_shape
        self.scale_key_w = scale_key_cols * D                       # a scale row's key part (quant.KVCodec.key_cols)
        scale_numel = L * H * (self.scale_key_w + T_max) if scale_dtype else 0   # [L, H_kv, W_max] per slot
        slot_bytes = slot_numel * dtype.itemsize + scale_numel * (scale_dtype.itemsize if scale_dtype else 0)
        n_slots = capacity_bytes // slot_bytes
        if n_slots < 1:
            raise PoolCapacityError(
                f"{name} pool of {capacity_bytes / 2**20:.0f} MiB holds no chunk of "
                f"{slot_bytes / 2**20:.1f} MiB ({self.slot_shape[3]} tokens); give it at least that much.")
        # [slots, slot_numel]; pinned host memory for the host tier (page-locked: DMA-able)
        self.arena = torch.empty((n_slots, slot_numel), dtype=dtype, device=device, pin_memory=pin)
        # [slots, L * H_kv * W_max]: the codes' scales, or None for model-dtype KV
        self.scale_arena = (torch.empty((n_slots, scale_numel), dtype=scale_dtype, device=device, pin_memory=pin)
                            if scale_dtype else None)
        self.stats = PoolStats(slots=n_slots, slot_bytes=slot_bytes)
        self._free = list(range(n_slots - 1, -1, -1))
        self._entries: OrderedDict[str, PoolEntry] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()

    # ---- queries -------------------------------------------------------------------
    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def check_fits(self, n_chunks: int, what: str = "a request") -> None:
        """Raise PoolCapacityError if n_chunks can never be resident at once."""
        if n_chunks > self.stats.slots:
            raise PoolCapacityError(
                f"{what} needs {n_chunks} chunks at once but the {self.name} pool holds "
                f"{self.stats.slots} ({self.stats.capacity_bytes / 2**30:.2f} GiB of "
                f"{self.stats.slot_bytes / 2**20:.1f} MiB slots); make the pool at least "
                f"{n_chunks * self.stats.slot_bytes / 2**30:.2f} GiB or retrieve fewer chunks.")

    # ---- use -----------------------------------------------------------------------
    def get(self, chunk_id: str, count: bool = True) -> PoolEntry | None:
        """The entry for chunk_id, acquired (refs + 1), or None. Counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(chunk_id)
            if entry is None or entry.failed is not None:
                if count:
                    self.stats.misses += 1
                return None
            self._entries.move_to_end(chunk_id)
            entry.refs += 1
            if count:
                self.stats.hits += 1
            return entry

    def allocate(self, chunk_id: str, n_tokens: int, rank: int = 0,
                 next_use: Mapping[str, int] | None = None) -> PoolEntry:
        """A fresh slot for chunk_id (acquired, not ready), evicting by the policy.

        Raises PoolFullError when nothing may be evicted (see the module doc).
        """
        T_max = self.slot_shape[3]
        if not 0 < n_tokens <= T_max:
            raise PoolCapacityError(
                f"chunk {chunk_id} has {n_tokens} tokens; the {self.name} pool's slots hold 1..{T_max}. "
                "Size the pools for the cache's chunk_tokens.")
        with self._lock:
            if chunk_id in self._entries:
                raise ValueError(f"chunk {chunk_id} is already in the {self.name} pool; get() it")
            if not self._free:
                self._evict_one(rank, next_use or {})
            slot = self._free.pop()
            L, two, H, _, D = self.slot_shape
            shape = (L, two, H, n_tokens, D)
            kv = self.arena[slot, : math.prod(shape)].view(shape)  # [L, 2, H_kv, T, D]
            sc = None
            if self.scale_arena is not None:  # [L, H_kv, W], contiguous like kv
                W = self.scale_key_w + n_tokens
                sc = self.scale_arena[slot, : L * H * W].view(L, H, W)
            nbytes = kv.numel() * self.dtype.itemsize + (sc.numel() * sc.element_size() if sc is not None else 0)
            entry = PoolEntry(chunk_id, slot, n_tokens, nbytes, kv, sc, refs=1)
            self._entries[chunk_id] = entry
            self.stats.used_bytes += entry.nbytes
            return entry

    def mark_ready(self, entry: PoolEntry, error: BaseException | None = None) -> None:
        """The entry's bytes are in (or filling failed: the entry is dropped)."""
        with self._lock:
            if error is None:
                self.stats.bytes_filled += entry.nbytes
            else:
                entry.failed = error
                self._drop(entry.chunk_id)
        entry.ready.set()

    def release(self, entry: PoolEntry) -> None:
        with self._lock:
            if entry.refs <= 0:
                raise RuntimeError(f"chunk {entry.chunk_id} released more often than acquired")
            entry.refs -= 1

    def evict(self, chunk_id: str) -> bool:
        """Drop chunk_id if nobody holds it. Returns whether it went."""
        with self._lock:
            entry = self._entries.get(chunk_id)
            if entry is None or entry.refs:
                return False
            self._drop(chunk_id)
            self.stats.evictions += 1
            return True

    def clear(self) -> None:
        """Evict every entry nobody holds."""
        for cid in self.resident():
            self.evict(cid)

    # ---- internals -----------------------------------------------------------------
    def _evict_one(self, rank: int, next_use: Mapping[str, int]) -> None:
        candidates = [cid for cid, e in self._entries.items() if e.refs == 0]
        victim = POLICIES[self.policy](candidates, next_use, rank)
        if victim is None:
            held = len(self._entries) - len(candidates)
            raise PoolFullError(
                f"{self.name} pool is full: {held} of {self.stats.slots} chunks are in use and the "
                f"other {len(candidates)} are needed by requests queued at or before position {rank}.")
        self._drop(victim)
        self.stats.evictions += 1

    def _drop(self, chunk_id: str) -> None:
        entry = self._entries.pop(chunk_id, None)
        if entry is not None:
            self.stats.used_bytes -= entry.nbytes
            self._free.append(entry.slot)
