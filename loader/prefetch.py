"""Queue-driven prefetch: disk -> pinned host pool on a thread pool (DESIGN §5).

    queue = RequestQueue()
    pre = Prefetcher(store, host_pool, queue, workers=8)
    pre.submit("req-1", chunk_ids)      # enqueued: its chunks start moving disk -> pinned now
    pre.cancel("req-2")                 # gone: reads not yet started are dropped
    entries = pre.acquire("req-1")      # at run time: pinned entries, reading what is still missing
    ...
    pre.finish("req-1", entries)        # release and leave the queue

Reads go straight from the shard file into the entry's pinned slot
(`os.preadv` at the tensor's offset in the safetensors file: one copy, and the
GIL is free while the kernel copies), never through a pageable tensor.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from . import format as fmt
from .errors import CorruptShardError, StoreError
from .pool import KVPool, PoolEntry, PoolFullError
from .store import Store, note_damage

ADVICE = "run `kvfuse verify CACHE_DIR` to list the damaged chunks, then `kvfuse build-cache --repair`"

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I32": torch.int32,
              "F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8}


def resident_bytes(fd: int) -> int | None:
    """How many bytes of the file open at fd are in the page cache (Linux mincore over a
    fresh read-only mapping); None where mincore is not available."""
    import ctypes
    import mmap

    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = torch.empty(pages, dtype=torch.uint8)
        if libc.mincore(ctypes.c_void_p(addr), size, ctypes.c_void_p(vec.data_ptr())) != 0:
            return None
        return int((vec & 1).sum()) * mmap.PAGESIZE
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)


class RequestQueue:
    """Pending requests in arrival order: id -> chunk ids. Position 0 runs next (or now)."""

    def __init__(self):
        self._requests: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def push(self, request_id: str, chunk_ids) -> None:
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} is already queued")
            self._requests[request_id] = tuple(chunk_ids)

    def remove(self, request_id: str) -> tuple[str, ...]:
        with self._lock:
            return self._requests.pop(request_id, ())

    def chunks(self, request_id: str) -> tuple[str, ...] | None:
        with self._lock:
            return self._requests.get(request_id)

    def position(self, request_id: str) -> int | None:
        with self._lock:
            for i, rid in enumerate(self._requests):
                if rid == request_id:
                    return i
            return None

    def next_use(self) -> dict[str, int]:
        """chunk id -> queue position of the first request that needs it."""
        with self._lock:
            out: dict[str, int] = {}
            for i, chunks in enumerate(self._requests.values()):
                for cid in chunks:
                    out.setdefault(cid, i)
            return out

    def items(self) -> list[tuple[str, tuple[str, ...]]]:
        """[(request id, chunk ids)] in queue order."""
        with self._lock:
            return list(self._requests.items())

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)


@dataclass(frozen=True)
class TensorSpan:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int   # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path) -> dict[str, TensorSpan]:
    """Tensor name -> where its bytes lie in a .safetensors file (format: u64 header length, JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    spans = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        spans[name] = TensorSpan(_ST_DTYPES.get(info["dtype"]), tuple(info["shape"]), 8 + n + a, b - a)
    return spans


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill buf from fd at offset (preadv may return short reads)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise CorruptShardError(f"shard ends early: wanted {len(buf)} bytes at {offset}, got {done}")
        done += n


class ShardReader:
    """Reads a chunk's tensors from its shard by byte offset; file handles and headers are kept open.

    The small per-chunk tensors (tokens, saliency: ~4 KB for a 512-token chunk, against tens of
    MB of KV) of the last `meta_entries` chunks read stay in memory, so a chunk the engine
    recomputes instead of loading needs no disk read when it was seen before."""

    def __init__(self, store: Store, drop_page_cache: bool = False, meta_entries: int = 16384):
        self.store = store
        self.drop_page_cache = drop_page_cache  # the pinned pool caches it: don't keep a second copy
        self._open: dict[str, tuple[int, dict[str, TensorSpan]]] = {}
        self._lock = threading.Lock()
        self._meta: OrderedDict[str, dict] = OrderedDict()    # chunk id -> tokens, saliency, pos_base (LRU)
        self.meta_entries = meta_entries

    def _remember(self, chunk_id: str, meta: dict) -> dict:
        with self._lock:
            self._meta[chunk_id] = meta
            self._meta.move_to_end(chunk_id)
            while len(self._meta) > self.meta_entries:
                self._meta.popitem(last=False)
        return meta

    def _shard(self, shard: str):
        with self._lock:
            if shard not in self._open:
                path = self.store.shard_path(shard)
                try:
                    spans = read_safetensors_header(path)
                except (OSError, ValueError, struct.error) as e:
                    note_damage(self.store.cache_dir, shard)
                    raise CorruptShardError(f"shard {path} cannot be read: {e}; {ADVICE}.") from e
                self._open[shard] = (os.open(path, os.O_RDONLY), spans)
            return self._open[shard]

    def spans(self, chunk_id: str) -> dict[str, TensorSpan]:
        rec = self.store.record(chunk_id)
        _, spans = self._shard(rec.shard)
        names = (("kv", fmt.kv_name), ("tok", fmt.tok_name), ("sal", fmt.sal_name))
        if self.store.codec.quantised:
            names += (("kvs", fmt.kvs_name),)
        try:
            return {k: spans[n(chunk_id)] for k, n in names}
        except KeyError as e:
            note_damage(self.store.cache_dir, rec.shard)
            raise CorruptShardError(f"shard {rec.shard} lacks {e.args[0]}; {ADVICE}.") from None

    def read_into(self, chunk_id: str, kv_out: torch.Tensor, verify: bool = False,
                  scales_out: torch.Tensor | None = None) -> dict:
        """Read chunk_id's KV bytes into kv_out ([L, 2, H_kv, T, D], contiguous, CPU), as stored
        (quantised codes stay codes: the GPU gather dequantises), and a quantised chunk's scales
        into scales_out ([L, H_kv, W] bfloat16); returns its tokens [T] int32, saliency
        [S, T] float16 and pos_base."""
        rec = self.store.record(chunk_id)
        fd, _ = self._shard(rec.shard)
        spans = self.spans(chunk_id)
        kv = spans["kv"]
        if kv.dtype != kv_out.dtype or kv.shape != tuple(kv_out.shape):
            raise StoreError(
                f"chunk {chunk_id} is {kv.dtype} {kv.shape} in shard {rec.shard}, but the pool expects "
                f"{kv_out.dtype} {tuple(kv_out.shape)}; size the pools for this cache's model and KV dtype.")
        out = [kv_out]
        if "kvs" in spans:
            sc = spans["kvs"]
            if scales_out is None or sc.dtype != scales_out.dtype or sc.shape != tuple(scales_out.shape):
                got = "none" if scales_out is None else f"{scales_out.dtype} {tuple(scales_out.shape)}"
                raise StoreError(f"chunk {chunk_id} has {sc.dtype} {sc.shape} scales in shard {rec.shard}, but the "
                                 f"pool gives {got}; make the pools with the store's KV codec (Tiers does).")
            pread_into(fd, memoryview(scales_out.view(torch.uint8).reshape(-1).numpy()), sc.start)
            out.append(scales_out)
        pread_into(fd, memoryview(kv_out.view(torch.uint8).reshape(-1).numpy()), kv.start)
        small = self._small(fd, spans)
        if self.drop_page_cache:
            os.posix_fadvise(fd, kv.start, kv.nbytes, os.POSIX_FADV_DONTNEED)
        if verify and fmt.checksum(kv_out, small["tok"], small["sal"], *out[1:]) != rec.checksum:
            note_damage(self.store.cache_dir, rec.shard)
            raise CorruptShardError(f"chunk {chunk_id} in shard {rec.shard} fails its checksum; {ADVICE}.")
        return self._remember(chunk_id, {"tokens": small["tok"], "saliency": small["sal"], "pos_base": rec.pos_base})

    def read_meta(self, chunk_id: str) -> dict:
        """chunk_id's tokens [T] int32, saliency [S, T] float16 and pos_base, without its KV
        (a chunk recomputed instead of loaded needs only its tokens); from memory when the
        chunk was read lately (chunk ids are content hashes: the bytes can't have changed)."""
        with self._lock:
            meta = self._meta.get(chunk_id)
            if meta is not None:
                self._meta.move_to_end(chunk_id)
                return meta
        rec = self.store.record(chunk_id)
        fd, _ = self._shard(rec.shard)
        small = self._small(fd, self.spans(chunk_id))
        return self._remember(chunk_id, {"tokens": small["tok"], "saliency": small["sal"], "pos_base": rec.pos_base})

    @staticmethod
    def _small(fd: int, spans: dict[str, TensorSpan]) -> dict[str, torch.Tensor]:
        small = {}
        for key in ("tok", "sal"):
            s = spans[key]
            t = torch.empty(s.shape, dtype=s.dtype)
            pread_into(fd, memoryview(t.view(torch.uint8).reshape(-1).numpy()), s.start)
            small[key] = t
        return small

    def drop_cached_pages(self) -> None:
        """Ask the kernel to forget every open shard's cached pages (a cold start for benchmarks).
        Each shard is flushed first: the kernel keeps dirty pages (a store written moments ago),
        and a "cold" read of those would run at memory speed."""
        for fd in self._shard_fds():
            try:
                os.fsync(fd)
            except OSError:  # a read-only descriptor on some filesystems: the pages are clean there anyway
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def cached_bytes(self) -> int | None:
        """Bytes of the open shards that sit in the page cache now (mincore; None where the
        platform has no mincore). A benchmark checks with it that a dropped cache really is cold:
        the kernel keeps pages that some process maps (e.g. a `Store.read` of a quantised chunk,
        which dequantises through the memory map), whatever `drop_cached_pages` asks."""
        got = [resident_bytes(fd) for fd in self._shard_fds()]
        return None if None in got else sum(got)

    def _shard_fds(self):
        """The descriptor of every shard of the store (opened on first use)."""
        for shard in {r.shard for r in self.store.records(include_prefix=True)}:
            yield self._shard(shard)[0]

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()


class Prefetcher:
    """Moves the chunks of queued requests from disk into the pinned pool on worker threads."""

    def __init__(self, store: Store, pool: KVPool, queue: RequestQueue | None = None, workers: int = 8,
                 verify: bool = False, drop_page_cache: bool = False):
        self.store = store
        self.pool = pool
        self.queue = queue or RequestQueue()
        self.verify = verify
        self.reader = ShardReader(store, drop_page_cache)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvfuse-prefetch")
        self._inflight: dict[str, Future] = {}   # chunk id -> read in progress or waiting
        self._lock = threading.RLock()             # re-entered by done-callbacks of cancelled reads
        self.disk_reads = 0
        self.disk_bytes = 0

    def use_store(self, store: Store) -> None:
        """Read chunks submitted from now on from `store` (a newer release of the same cache).

        Chunk ids are content hashes, so a chunk already pooled from the older release is the
        same bytes; shard files are immutable, so open handles stay valid."""
        if store is not self.store:
            with self._lock:
                self.store = self.reader.store = store

    # ---- the queue -----------------------------------------------------------------
    def submit(self, request_id: str, chunk_ids) -> None:
        """Enqueue a request and start reading its chunks that aren't pinned yet, last chunk first."""
        chunk_ids = list(dict.fromkeys(chunk_ids))
        for cid in chunk_ids:
            self.store.record(cid)  # unknown ids fail now, not on a worker
        self.queue.push(request_id, chunk_ids)
        # from the back: a request that finds chunks cold may prefill its front from the tokens while
        # the back is read (`kvfuse.runtime.coldplan`), so the reads that start first are the useful ones
        for cid in reversed(chunk_ids):
            self._schedule(cid)

    def cancel(self, request_id: str) -> None:
        """The request went away: drop it from the queue and cancel reads nobody else needs."""
        chunks = self.queue.remove(request_id)
        needed = self.queue.next_use()
        with self._lock:
            for cid in chunks:
                fut = self._inflight.get(cid)
                if cid not in needed and fut is not None:
                    fut.cancel()  # only if not started; its done-callback forgets it

    def acquire(self, request_id: str, only: list[str] | None = None, counts: dict | None = None) -> list[PoolEntry]:
        """The request's pinned entries in its chunk order (or those of `only`), each held until
        released. Waits for reads in flight and reads what the prefetch couldn't fit, itself.
        counts (if given) gets "warm" (pinned and ready already) and "cold" (waited for disk).
        """
        chunk_ids = self._chunks_of(request_id) if only is None else list(only)
        self.pool.check_fits(len(chunk_ids), f"request {request_id}")
        entries: list[PoolEntry] = []
        try:
            for cid in chunk_ids:
                entry, ready = self._acquire_one(cid)
                entries.append(entry)
                if counts is not None:
                    key = "warm" if ready else "cold"
                    counts[key] = counts.get(key, 0) + 1
        except BaseException:
            for e in entries:
                self.pool.release(e)
            raise
        return entries

    def state(self, cid: str) -> str:
        """Where chunk cid is for a run now: "warm" (pinned, ready), "reading" (its read is
        running or its slot filling) or "cold" (on disk; a queued read, if any, not started)."""
        with self._lock:
            fut = self._inflight.get(cid)
            entry = self.pool._entries.get(cid)
            if entry is not None and entry.failed is None:
                return "warm" if entry.ready.is_set() else "reading"
            return "reading" if fut is not None and fut.running() else "cold"

    def skip(self, request_id: str, chunk_ids) -> None:
        """The request won't read chunk_ids (it recomputes them): cancel their reads not yet
        started that no other queued request needs."""
        others = {c for rid, chunks in self.queue.items() if rid != request_id for c in chunks}
        with self._lock:
            for cid in chunk_ids:
                fut = self._inflight.get(cid)
                if fut is not None and cid not in others:
                    fut.cancel()

    def drain(self) -> None:
        """Wait for every read in flight (those a recomputing request left running, for example)."""
        with self._lock:
            futures = list(self._inflight.values())
        wait(futures)

    def finish(self, request_id: str, entries: list[PoolEntry] = ()) -> None:
        """The request ran: release its entries and take it off the queue."""
        for e in entries:
            self.pool.release(e)
        self.queue.remove(request_id)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.reader.close()

    # ---- internals -----------------------------------------------------------------
    def _chunks_of(self, request_id: str) -> list[str]:
        chunks = self.queue.chunks(request_id)
        if chunks is None:
            raise KeyError(f"request {request_id!r} is not queued; submit() it first")
        return list(chunks)

    def _schedule(self, cid: str) -> None:
        with self._lock:
            if cid in self.pool or cid in self._inflight:
                return
            fut = self._executor.submit(self._read, cid)
            self._inflight[cid] = fut
            fut.add_done_callback(lambda f, c=cid: self._forget(c, f))

    def _forget(self, cid: str, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(cid) is fut:
                del self._inflight[cid]

    def _read(self, cid: str, rank: int | None = None) -> PoolEntry | None:
        """Read cid into a fresh pinned slot. Returns the entry (held) when rank is given (a run),
        else releases it and returns None; a prefetch that finds no room gives up quietly."""
        next_use = self.queue.next_use()
        prefetch = rank is None
        if prefetch:
            if cid not in next_use:      # every request needing it went away
                return None
            rank = next_use[cid]
        with self.pool._lock:
            entry = self.pool.get(cid, count=False)
            if entry is None:
                rec = self.store.record(cid)
                try:
                    entry = self.pool.allocate(cid, rec.n_tokens, rank, next_use)
                except PoolFullError:
                    if prefetch:
                        return None
                    raise
                fill = True
            else:
                fill = False
        if fill:
            try:
                entry.meta = self.reader.read_into(cid, entry.kv, self.verify, entry.scales)
                with self._lock:
                    self.disk_reads += 1
                    self.disk_bytes += entry.nbytes
            except BaseException as e:
                self.pool.mark_ready(entry, e)
                self.pool.release(entry)
                raise
            self.pool.mark_ready(entry)
        if prefetch:
            self.pool.release(entry)
            return None
        return entry

    def _acquire_one(self, cid: str) -> tuple[PoolEntry, bool]:
        """Hit: the chunk is pinned (or being read into its slot). Miss: read it now, unless a
        prefetch already started reading it (then wait for that one)."""
        entry = self.pool.get(cid)  # counts the pinned tier's hit or miss
        was_ready = entry is not None and entry.ready.is_set()
        if entry is None:
            with self._lock:
                fut = self._inflight.get(cid)
            if fut is not None and not fut.cancel():
                fut.result()                                 # running: let it finish
                entry = self.pool.get(cid, count=False)
            if entry is None:
                entry = self._read(cid, rank=0)
        entry.ready.wait()
        if entry.failed is not None:
            self.pool.release(entry)
            raise entry.failed
        return entry, was_ready
