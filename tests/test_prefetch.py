"""Queue-driven prefetch disk -> pinned pool: reads, look-ahead, cancellation, errors."""

import threading

import pytest
import time

import torch

from kvfuse.bench.synthetic import write_synthetic_store
from kvfuse.loader.errors import StoreError, UnknownChunkError
from kvfuse.loader.pool import KVPool, PoolCapacityError
from kvfuse.loader.prefetch import Prefetcher, RequestQueue, read_safetensors_header
from kvfuse.loader.store import Store
from kvfuse.runtime.model import ModelSpec

SPEC = ModelSpec(name="fake", arch="llama", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, dtype=torch.float32,
                 rope_theta=1e4, rope_type="default", max_positions=4096, fingerprint="fake-fp")
T = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    prefix, ids = write_synthetic_store(root, SPEC, n_chunks=6, chunk_tokens=T, prefix_tokens=3,
                                        shard_bytes=4096)
    return Store.open(root), prefix, ids


def pool(n_slots, policy="lookahead"):
    slot = (SPEC.n_layers, 2, SPEC.n_kv_heads, T, SPEC.head_dim)
    return KVPool("pinned", n_slots * 2 * 2 * 2 * T * 4 * 4, slot, torch.float32, policy=policy)


def test_queue_next_use():
    q = RequestQueue()
    q.push("r1", ["a", "b"])
    q.push("r2", ["b", "c"])
    assert q.next_use() == {"a": 0, "b": 0, "c": 1}
    assert q.position("r2") == 1 and q.chunks("r1") == ("a", "b")
    with pytest.raises(ValueError):
        q.push("r1", [])
    q.remove("r1")
    assert q.next_use() == {"b": 0, "c": 0}


def test_header_offsets_match_safetensors(store):
    st, _, ids = store
    rec = st.record(ids[0])
    spans = read_safetensors_header(st.shard_path(rec.shard))
    kv = spans[f"{ids[0]}.kv"]
    assert kv.shape == (2, 2, 2, T, 4) and kv.dtype == torch.float32 and kv.nbytes == 2 * 2 * 2 * T * 4 * 4


def test_submit_reads_into_pinned_slots(store):
    st, prefix, ids = store
    pre = Prefetcher(st, pool(8), workers=2, verify=True)
    try:
        pre.submit("r1", [prefix, *ids[:3]])
        entries = pre.acquire("r1")
        for e, cid in zip(entries, [prefix, *ids[:3]]):
            want = st.read(cid)
            assert torch.equal(e.kv, want.kv) and torch.equal(e.meta["tokens"], want.tokens)
            assert torch.equal(e.meta["saliency"], want.saliency) and e.meta["pos_base"] == want.pos_base
        assert entries[0].kv.shape[3] == 3
        pre.finish("r1", entries)
        # a prefetch worker drops its own reference just after marking the slot ready
        deadline = time.monotonic() + 5
        while any(e.refs for e in entries) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "r1" not in pre.queue and all(e.refs == 0 for e in entries)
        assert pre.disk_reads == 4
        # a second request over the same chunks is all pinned hits, no disk
        pre.submit("r2", ids[:3])
        counts = {}
        pre.finish("r2", pre.acquire("r2", counts=counts))
        assert counts == {"warm": 3} and pre.disk_reads == 4
    finally:
        pre.close()


def test_acquire_reads_what_prefetch_skipped(store):
    st, _, ids = store
    pre = Prefetcher(st, pool(2), workers=1)
    try:
        pre.submit("r1", ids[:2])
        pre.submit("r2", ids[2:4])   # no room: r1's chunks are protected, so the prefetch gives up
        first = pre.acquire("r1")
        assert set(pre.pool.resident()) == set(ids[:2])
        pre.finish("r1", first)
        counts = {}
        second = pre.acquire("r2", counts=counts)
        assert counts == {"cold": 2} and [e.chunk_id for e in second] == ids[2:4]
        pre.finish("r2", second)
    finally:
        pre.close()


def test_cancel_drops_reads_not_started(store):
    st, _, ids = store
    pre = Prefetcher(st, pool(8), workers=1)
    gate, started = threading.Event(), threading.Event()
    real = pre.reader.read_into

    def slow_read(cid, out, verify=False, scales=None):
        started.set()
        gate.wait(5)
        return real(cid, out, verify, scales)

    pre.reader.read_into = slow_read
    try:
        pre.submit("r1", ids[:1])
        assert started.wait(5)            # the single worker is busy with r1
        pre.submit("r2", ids[1:4])        # queued behind it
        pre.submit("r3", ids[3:5])        # shares ids[3] with r2
        pre.cancel("r2")
        gate.set()
        pre.finish("r1", pre.acquire("r1"))
        pre.finish("r3", pre.acquire("r3"))
        assert not any(c in pre.pool for c in ids[1:3])      # cancelled, never read
        assert ids[3] in pre.pool                             # still needed by r3
        assert pre.disk_reads == 3
    finally:
        pre.close()


def test_oversize_request_errors_and_loses_nothing(store):
    st, _, ids = store
    pre = Prefetcher(st, pool(2), workers=1)
    try:
        pre.submit("ok", ids[:2])
        pre.finish("ok", pre.acquire("ok"))
        pre.submit("big", ids[:3])
        with pytest.raises(PoolCapacityError, match="needs 3 chunks.*holds 2") as err:
            pre.acquire("big")
        assert isinstance(err.value, StoreError)
        pre.cancel("big")
        assert set(pre.pool.resident()) == set(ids[:2])
        assert all(pre.pool.get(c, count=False).refs == 1 for c in ids[:2])
    finally:
        pre.close()


def test_unknown_chunk_fails_at_submit(store):
    st, _, ids = store
    pre = Prefetcher(st, pool(2), workers=1)
    try:
        with pytest.raises(UnknownChunkError):
            pre.submit("r", [ids[0], "nope"])
        assert "r" not in pre.queue
    finally:
        pre.close()


def test_wrong_pool_shape_is_a_clear_error(store):
    st, _, ids = store
    slot = (3, 2, 2, T, 4)  # a pool sized for another model
    pre = Prefetcher(st, KVPool("pinned", 1 << 20, slot, torch.float32), workers=1)
    try:
        pre.submit("r", ids[:1])
        with pytest.raises(StoreError, match="size the pools"):
            pre.acquire("r")
        assert ids[0] not in pre.pool
    finally:
        pre.close()


def test_chunk_metadata_stays_in_memory_bounded(store):
    """A recomputed chunk needs only its tokens: read once from the shard, then from memory
    (the last `meta_entries` chunks), equal to what the shard holds."""
    from kvfuse.loader.prefetch import ShardReader
    st, _, ids = store
    reader = ShardReader(st, meta_entries=2)
    reads = []
    small = reader._small
    reader._small = lambda fd, spans: reads.append(1) or small(fd, spans)
    first = reader.read_meta(ids[0])
    again = reader.read_meta(ids[0])
    assert len(reads) == 1 and again is first
    assert torch.equal(first["tokens"], st.read(ids[0]).tokens)
    reader.read_meta(ids[1])
    reader.read_meta(ids[2])                          # evicts ids[0], the least recently used
    reader.read_meta(ids[0])
    assert len(reads) == 4 and len(reader._meta) == 2
    reader.close()
