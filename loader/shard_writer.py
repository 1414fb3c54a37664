"""Writing shards on a few threads while the caller computes the next chunks (issue 14).

    with ShardWriterPool(cache_dir, metadata, target_bytes=1 << 30, writers=2) as pool:
        for chunk_id, kv, tokens, saliency, ready in chunks:     # kv [L, 2, H_kv, T, D] on the host
            pool.add(chunk_id, kv, tokens, saliency, ready=ready, bytes_after=...)
    written = pool.written                                        # list[WrittenChunk]

Each shard is one `ShardWriter` (loader/writer.py: the same encode, checksums,
sums file, tmp + fsync + rename, so the same crash guarantees and byte-identical
shards). What this adds is *where* that work runs: a chunk handed to `add` is
only queued; when a shard's worth is queued it goes to one of `writers` threads,
which waits for the chunk's bytes to be on the host (`ready`, e.g. a CUDA
event's synchronize after an asynchronous device-to-host copy), checksums and
serialises it and fsyncs the shard once. The compute thread never waits for a
disk unless `writers` shards are already queued or being written (then `add`
blocks: memory stays bounded at about (writers + 1) x target_bytes of chunks).

`bytes_after` (the bytes of the chunks still to come, if the caller knows) also
closes a shard once it holds at least as much as what is left: the last shards
of a job get smaller and smaller, so the write that nobody overlaps (the one
after the last chunk's prefill) is about one chunk, not one whole shard.

Errors: a writer's failure (StoreError for disk full / no permission, as
`ShardWriter.flush` raises it) is raised by the next `add` or by `close`; the
shards already written stay (a rerun reuses them), nothing half-written does.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from .writer import ShardWriter, WrittenChunk

_NEVER = 1 << 62  # a ShardWriter target it never reaches: the pool decides where shards end


class ShardWriterPool:
    """Queues chunks into shards of ~target_bytes and writes each shard on one of `writers` threads."""

    def __init__(self, cache_dir: Path, metadata: dict[str, str], target_bytes: int = 1 << 30, writers: int = 2):
        if writers < 1:
            raise ValueError(f"writers must be >= 1, got {writers}")
        self.cache_dir, self.metadata, self.target_bytes = Path(cache_dir), metadata, target_bytes
        self._threads = ThreadPoolExecutor(writers, thread_name_prefix="kvfuse-shard")
        self._slots = threading.Semaphore(writers)  # shards queued or being written
        self._batch: list[tuple] = []
        self._bytes = 0
        self._futures: list[Future] = []
        self.written: list[WrittenChunk] = []

    def add(self, chunk_id: str, kv: torch.Tensor, tokens: torch.Tensor, saliency: torch.Tensor,
            ready: Callable[[], None] | None = None, bytes_after: int | None = None,
            scales: torch.Tensor | None = None) -> None:
        """Queue one chunk: kv [L, 2, H_kv, T, D], tokens [T], saliency [S, T] (and the codes'
        scales when kv holds codes: `ShardWriter.add`), on the host once `ready()` returned
        (None: already). bytes_after: bytes of the chunks still to come.
        Raises the error of a shard write that failed since the last call."""
        self._raise_failed()
        self._batch.append((chunk_id, kv, tokens, saliency, scales, ready))
        self._bytes += sum(t.numel() * t.element_size() for t in (kv, saliency, *(() if scales is None else (scales,))))
        self._bytes += tokens.numel() * 4
        if self._bytes >= self.target_bytes or (bytes_after is not None and self._bytes >= bytes_after):
            self._submit()

    def close(self) -> list[WrittenChunk]:
        """Write what is queued, wait for every shard; returns all chunks written. Raises the first error."""
        try:
            self._submit()
            for fut in self._futures:
                self.written.extend(fut.result())
            self._futures = []
        finally:
            self._threads.shutdown(wait=True, cancel_futures=True)
        return self.written

    def abort(self) -> None:
        """Stop after the shards being written (queued ones are dropped: their chunks are recomputed by a rerun)."""
        self._batch = []
        self._threads.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ShardWriterPool":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _submit(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._bytes = self._batch, [], 0
        while not self._slots.acquire(timeout=0.5):  # all writers busy: wait (bounded memory)
            self._raise_failed()
        fut = self._threads.submit(self._write, batch)
        fut.add_done_callback(lambda _: self._slots.release())
        self._futures.append(fut)

    def _write(self, batch: list[tuple]) -> list[WrittenChunk]:
        shard = ShardWriter(self.cache_dir, self.metadata, _NEVER)
        for chunk_id, kv, tokens, saliency, scales, ready in batch:
            if ready is not None:
                ready()  # the chunk's bytes are on the host from here on
            shard.add(chunk_id, kv, tokens, saliency, scales=scales)
        return shard.flush()

    def _raise_failed(self) -> None:
        for fut in self._futures:
            if fut.done() and fut.exception() is not None:
                raise fut.exception()
