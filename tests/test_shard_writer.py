"""ShardWriterPool (loader/shard_writer.py) and HostStager (pipeline/staging.py): shards written on
threads, bounded memory, errors surfaced, the last shards cut small, pinned async copies on CUDA."""

import threading
import time

import pytest
import torch
from safetensors import safe_open

from kvfuse.loader import format as fmt
from kvfuse.loader.errors import StoreError
from kvfuse.loader.shard_writer import ShardWriterPool
from kvfuse.loader.writer import ShardWriter, init_cache_dir
from kvfuse.pipeline.staging import HostStager

META = {"format_version": "1"}


def chunk(i: int, T: int = 8):
    g = torch.Generator().manual_seed(i)
    return (f"c{i:03d}", torch.randn(2, 2, 2, T, 4, generator=g), torch.arange(T) + i,
            torch.rand(2, T, generator=g).half())


def nbytes(kv, tok, sal):
    return kv.numel() * 4 + tok.numel() * 4 + sal.numel() * 2


def test_pool_writes_readable_shards_with_the_writers_checksums(tmp_path):
    init_cache_dir(tmp_path)
    chunks = [chunk(i) for i in range(7)]
    with ShardWriterPool(tmp_path, META, target_bytes=3 * nbytes(*chunks[0][1:]), writers=2) as pool:
        for cid, kv, tok, sal in chunks:
            pool.add(cid, kv, tok, sal)
    shards = {w.shard for w in pool.written}
    assert sorted(w.chunk_id for w in pool.written) == [c[0] for c in chunks] and len(shards) == 3  # 3 + 3 + 1
    for w in pool.written:
        cid, kv, tok, sal = chunks[int(w.chunk_id[1:])]
        assert w.checksum == fmt.checksum(kv, tok.int(), sal)
        with safe_open(str(tmp_path / fmt.SHARDS_DIR / f"{w.shard}{fmt.SHARD_SUFFIX}"), framework="pt") as f:
            assert torch.equal(f.get_tensor(fmt.kv_name(cid)), kv) and f.metadata() == META


def test_codes_encoded_elsewhere_are_stored_as_an_encoding_writer_stores_them(tmp_path):
    """A GPU build encodes fp8 there and hands the writer codes + scales: the shard holds the
    bytes (and checksums) of a writer that encodes itself; codes of another dtype are refused."""
    from kvfuse.loader.quant import kv_codec
    meta = {"format_version": "2", "kv_dtype": "fp8"}
    codec = kv_codec("fp8")
    for name in ("self", "given"):
        init_cache_dir(tmp_path / name)
    cid, kv, tok, sal = chunk(0)
    itself, given = ShardWriter(tmp_path / "self", meta), ShardWriter(tmp_path / "given", meta)
    itself.add(cid, kv, tok, sal)
    given.add(cid, *codec.encode(kv)[:1], tok, sal, scales=codec.encode(kv)[1])
    a, b = itself.flush()[0], given.flush()[0]
    assert a.checksum == b.checksum
    with pytest.raises(ValueError, match="holds fp8 KV"):
        given.add(cid, kv, tok, sal, scales=codec.encode(kv)[1])   # float32 KV is not fp8 codes


def test_last_shards_shrink_so_the_unoverlapped_write_is_one_chunk(tmp_path):
    init_cache_dir(tmp_path)
    chunks = [chunk(i) for i in range(12)]
    size = nbytes(*chunks[0][1:])
    with ShardWriterPool(tmp_path, META, target_bytes=4 * size, writers=1) as pool:
        for i, (cid, kv, tok, sal) in enumerate(chunks):
            pool.add(cid, kv, tok, sal, bytes_after=(len(chunks) - 1 - i) * size)
    per_shard = {}
    for w in pool.written:
        per_shard[w.shard] = per_shard.get(w.shard, 0) + 1
    assert [per_shard[s] for s in dict.fromkeys(w.shard for w in pool.written)] == [4, 4, 2, 1, 1]


def test_add_blocks_while_every_writer_is_busy_and_ready_runs_first(tmp_path, monkeypatch):
    init_cache_dir(tmp_path)
    release, flushing, order = threading.Event(), [], []
    orig = ShardWriter.flush

    def slow_flush(self):
        flushing.append(1)
        release.wait(10)
        return orig(self)

    monkeypatch.setattr(ShardWriter, "flush", slow_flush)
    pool = ShardWriterPool(tmp_path, META, target_bytes=1, writers=1)  # a shard per chunk
    added = []

    def producer():
        for i in range(3):
            cid, kv, tok, sal = chunk(i)
            pool.add(cid, kv, tok, sal, ready=lambda i=i: order.append(i))
            added.append(i)

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(1.0)
    assert added == [0] and flushing == [1]  # shard 0 is being written; chunk 1 waits for a free writer
    release.set()
    t.join(10)
    assert pool.close() and added == [0, 1, 2] and order == [0, 1, 2]


def test_a_failed_shard_write_is_raised_by_the_next_add_or_close(tmp_path, monkeypatch):
    init_cache_dir(tmp_path)

    def full(self):
        raise StoreError("cannot write shard x: No space left on device")

    monkeypatch.setattr(ShardWriter, "flush", full)
    pool = ShardWriterPool(tmp_path, META, target_bytes=1, writers=1)
    pool.add(*chunk(0))
    with pytest.raises(StoreError, match="No space"):
        for i in range(1, 50):
            pool.add(*chunk(i))
            time.sleep(0.05)
    pool.abort()
    pool = ShardWriterPool(tmp_path, META, target_bytes=1 << 30, writers=1)
    pool.add(*chunk(0))
    with pytest.raises(StoreError, match="No space"):
        pool.close()


def test_stager_on_the_cpu_hands_back_the_tensors():
    kv = torch.randn(2, 2, 2, 8, 4)
    (out,), ready = HostStager("cpu").stage(kv)
    assert ready is None and out.data_ptr() == kv.data_ptr()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stager_copies_into_pinned_memory_without_blocking():
    stager = HostStager("cuda")
    kv = torch.randn(32, 2, 8, 512, 128, device="cuda", dtype=torch.bfloat16)
    sal = torch.rand(2, 512, device="cuda").half()
    want = kv.cpu(), sal.cpu()
    (host_kv, host_sal), ready = stager.stage(kv, sal)
    del kv  # its memory is not reused before the copy is done (record_stream)
    torch.randn(32, 2, 8, 512, 128, device="cuda", dtype=torch.bfloat16)
    ready()
    assert host_kv.is_pinned() and torch.equal(host_kv, want[0]) and torch.equal(host_sal, want[1])
