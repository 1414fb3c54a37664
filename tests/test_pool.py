"""Pools: accounting, eviction order (LRU and look-ahead), capacity errors."""

import pytest
import torch

from kvfuse.loader.errors import StoreError
from kvfuse.loader.pool import KVPool, PoolCapacityError, PoolFullError

SLOT = (2, 2, 1, 4, 3)            # [L, 2, H_kv, T_max, D]
SLOT_BYTES = 2 * 2 * 1 * 4 * 3 * 4  # float32


def make(n_slots=3, policy="lookahead"):
    return KVPool("test", n_slots * SLOT_BYTES + 5, SLOT, torch.float32, policy=policy)


def fill(pool, cid, n_tokens=4, next_use=None, rank=0):
    e = pool.allocate(cid, n_tokens, rank, next_use or {})
    e.kv.fill_(float(len(cid)))
    pool.mark_ready(e)
    pool.release(e)
    return e


def test_accounting_and_views():
    pool = make()
    assert pool.stats.slots == 3 and pool.stats.capacity_bytes == 3 * SLOT_BYTES
    e = fill(pool, "a", n_tokens=2)
    assert e.kv.shape == (2, 2, 1, 2, 3) and e.kv.is_contiguous()
    assert pool.stats.used_bytes == e.nbytes == 2 * 2 * 1 * 2 * 3 * 4
    assert pool.stats.bytes_filled == e.nbytes
    assert pool.get("b") is None and pool.stats.misses == 1
    got = pool.get("a")
    assert got is e and got.refs == 1 and pool.stats.hits == 1
    assert pool.stats.hit_rate == 0.5
    pool.release(got)
    with pytest.raises(RuntimeError):
        pool.release(got)
    assert pool.evict("a") and pool.stats.used_bytes == 0 and pool.stats.evictions == 1


def test_slots_do_not_overlap():
    pool = make()
    for cid in ("a", "bb", "ccc"):
        fill(pool, cid)
    for cid, v in (("a", 1.0), ("bb", 2.0), ("ccc", 3.0)):
        e = pool.get(cid)
        assert torch.all(e.kv == v)
        pool.release(e)


def test_lru_evicts_least_recently_used():
    pool = make(policy="lru")
    for cid in "abc":
        fill(pool, cid)
    pool.release(pool.get("a"))            # a is now the most recent
    fill(pool, "d")
    assert set(pool.resident()) == {"a", "c", "d"}
    fill(pool, "e", next_use={"c": 1})     # LRU ignores the queue
    assert "c" not in pool


def test_in_use_is_never_evicted():
    pool = make(policy="lru")
    for cid in "abc":
        fill(pool, cid)
    held = [pool.get(c) for c in "abc"]
    with pytest.raises(PoolFullError):
        pool.allocate("d", 4, 0, {})
    pool.release(held[1])
    fill(pool, "d")
    assert set(pool.resident()) == {"a", "c", "d"}


def test_lookahead_never_evicts_a_queued_chunk_while_another_can_go():
    pool = make()
    for cid in "abc":
        fill(pool, cid)
    # a is the least recently used but queued; b and c are not needed: b goes (LRU among them)
    fill(pool, "d", next_use={"a": 1, "d": 0})
    assert set(pool.resident()) == {"a", "c", "d"}
    fill(pool, "e", next_use={"a": 2, "d": 1, "e": 0})
    assert set(pool.resident()) == {"a", "d", "e"}


def test_lookahead_furthest_next_use_first_and_rank():
    pool = make()
    for cid in "abc":
        fill(pool, cid)
    queue = {"a": 3, "b": 1, "c": 2}
    # the running request (rank 0) may take the slot of the furthest-needed chunk
    fill(pool, "x", next_use={**queue, "x": 0})
    assert "a" not in pool and {"b", "c"} <= set(pool.resident())
    # a prefetch for the request at position 2 may not push out chunks needed at 1 or 2
    with pytest.raises(PoolFullError):
        pool.allocate("y", 4, rank=2, next_use={"b": 1, "c": 2, "x": 0, "y": 2})
    assert set(pool.resident()) == {"b", "c", "x"}


def test_capacity_errors_are_store_errors():
    with pytest.raises(PoolCapacityError, match="holds no chunk"):
        KVPool("tiny", SLOT_BYTES - 1, SLOT, torch.float32)
    pool = make(2)
    with pytest.raises(PoolCapacityError, match="needs 3 chunks") as err:
        pool.check_fits(3, "request r")
    assert isinstance(err.value, StoreError)
    with pytest.raises(PoolCapacityError, match="tokens"):
        pool.allocate("big", 5)
    pool.check_fits(2)


def test_failed_fill_drops_the_entry():
    pool = make()
    e = pool.allocate("a", 4)
    pool.mark_ready(e, OSError("disk gone"))
    pool.release(e)
    assert "a" not in pool and pool.stats.used_bytes == 0 and e.ready.is_set()


def test_unknown_policy():
    with pytest.raises(ValueError, match="lookahead"):
        make(policy="fifo")
