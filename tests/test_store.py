"""Store format (DESIGN §2): round trips (model dtype and fp8/int8 codes), release pinning,
model checks, corruption, unsafe paths, and a writer killed mid-build."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kvfuse.loader import format as fmt
from kvfuse.loader.errors import (
    CorruptShardError,
    ModelMismatchError,
    NoReleaseError,
    UnknownChunkError,
    UnsafePathError,
)
from kvfuse.loader.errors import StoreError
from kvfuse.loader.manifest import index_digest, read_manifest, write_index, write_manifest
from kvfuse.loader.store import Store, read_current
from kvfuse.loader.writer import (
    ShardWriter,
    init_cache_dir,
    publish_release,
    remove_stale_tmp,
    scan_shards,
    verify_leftover,
)

FP = "fp-model-aaaa"
L, H, D = 2, 2, 4


def make_chunk(seed: int, n_tokens: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(L, 2, H, n_tokens, D, generator=g).to(dtype)
    tokens = torch.randint(0, 1000, (n_tokens,), generator=g, dtype=torch.int32)
    sal = torch.rand(len(fmt.SALIENCY_SIGNALS), n_tokens, generator=g).to(torch.float16)
    return kv, tokens, sal


def write_release(cache_dir: Path, chunks: dict, *, dtype="float32", fingerprint=FP, target_bytes=512,
                  kv_dtype="model", manifest_kv_dtype=None):
    """chunks: chunk_id -> (kv, tokens, sal). Returns (release id, {chunk_id: shard}).
    kv_dtype: how the writer stores the KV; manifest_kv_dtype: what the manifest claims (default: the same)."""
    init_cache_dir(cache_dir)
    w = ShardWriter(
        cache_dir,
        metadata={"format_version": str(fmt.FORMAT_VERSION), "saliency": ",".join(fmt.SALIENCY_SIGNALS),
                  "kv_dtype": kv_dtype},
        target_bytes=target_bytes,
    )
    for cid, (kv, tok, sal) in chunks.items():
        w.add(cid, kv, tok, sal)
    w.flush()
    rows = []
    for i, wc in enumerate(w.written):
        n = chunks[wc.chunk_id][1].shape[0]
        rows.append(
            {
                "chunk_id": wc.chunk_id,
                "doc_id": "__prefix__" if i == 0 else f"doc{i // 3}",
                "chunk_no": -1 if i == 0 else i % 3,
                "n_tokens": n,
                "shard": wc.shard,
                "pos_base": 0 if i == 0 else 8,
                "neighbours": [],
                "checksum": wc.checksum,
                "char_start": 0,
                "char_end": 10,
                "text": f"text {wc.chunk_id}",
            }
        )
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    manifest = {
        "model": {"name": "tiny", "fingerprint": fingerprint, "dtype": dtype, "kv_bytes_per_token": L * 2 * H * D * elem,
                  "kv_dtype": manifest_kv_dtype or kv_dtype, "n_layers": L, "n_kv_heads": H, "head_dim": D},
        "prefix": {"chunk_id": w.written[0].chunk_id},
        "params": {},
    }
    release = publish_release(cache_dir, rows, manifest)
    return release, {wc.chunk_id: wc.shard for wc in w.written}


def some_chunks(n=6, dtype=torch.float32, seed0=0, prefix="c"):
    return {f"{prefix}{seed0 + i:04d}": make_chunk(seed0 + i, 3 + i, dtype) for i in range(n)}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(fmt.tensor_bytes(a)) == bytes(fmt.tensor_bytes(b))


# ---- round trip ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_bit_identical(tmp_path, dtype):
    chunks = some_chunks(7, dtype)
    release, shards = write_release(tmp_path, chunks, dtype=fmt.dtype_name(dtype))
    assert len(set(shards.values())) > 1  # small target_bytes -> several shards
    assert read_current(tmp_path) == release

    store = Store.open(tmp_path)
    assert store.release == release
    store.check_model(FP, dtype)
    store.check_model(FP, fmt.dtype_name(dtype))
    assert len(store) == 7
    assert len(store.records()) == 6 and len(store.records(include_prefix=True)) == 7
    for cid, (kv, tok, sal) in chunks.items():
        got = store.read(cid)
        assert same_bytes(got.kv, kv)
        assert same_bytes(got.tokens, tok)
        assert same_bytes(got.saliency, sal)
        assert got.kv.dtype == dtype and got.tokens.dtype == torch.int32 and got.saliency.dtype == torch.float16
    st = store.stats()
    assert st["chunks"] == 6 and st["fingerprint"] == FP


@pytest.mark.parametrize("kv_dtype, bound", [("fp8", 0.04), ("int8", 0.01)])
def test_quantised_roundtrip(tmp_path, kv_dtype, bound):
    """Codes and scales in the shard; Store.read gives the model dtype, within the codec's error."""
    chunks = some_chunks(5)
    write_release(tmp_path, chunks, kv_dtype=kv_dtype)
    store = Store.open(tmp_path)
    assert store.codec.name == kv_dtype
    for cid, (kv, tok, sal) in chunks.items():
        got = store.read(cid)
        assert got.kv.dtype == torch.float32 and got.kv.shape == kv.shape
        assert float((got.kv - kv).norm() / kv.norm()) < bound
        assert same_bytes(got.tokens, tok) and same_bytes(got.saliency, sal)
    st = store.stats()
    tokens = [c[1].shape[0] for c in chunks.values()]
    assert st["kv_dtype"] == kv_dtype
    W = store.codec.row_width  # fp8: key scales and offsets, value scales; int8: no offsets
    assert st["kv_bytes"] == sum(t * L * 2 * H * D + L * H * W(D, t) * 2 for t in tokens)  # bf16 scales
    assert st["kv_bytes_per_token"] == round(st["kv_bytes"] / sum(tokens), 1)
    assert store.stored_bytes(tokens[0]) == tokens[0] * L * 2 * H * D + L * H * W(D, tokens[0]) * 2  # one chunk


def test_quantised_scale_bit_flip_fails_checksum(tmp_path):
    chunks = some_chunks(3)
    _, shards = write_release(tmp_path, chunks, kv_dtype="fp8", target_bytes=1 << 20)
    cid = "c0001"
    path = tmp_path / fmt.SHARDS_DIR / f"{shards[cid]}{fmt.SHARD_SUFFIX}"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header[fmt.kv_name(cid)]["dtype"] == "F8_E4M3" and header[fmt.kvs_name(cid)]["dtype"] == "BF16"
    start, _ = header[fmt.kvs_name(cid)]["data_offsets"]
    data[8 + n + start + 2] ^= 0x10
    path.write_bytes(bytes(data))
    store = Store.open(tmp_path)
    store.read("c0000")
    with pytest.raises(CorruptShardError, match="checksum"):
        store.read(cid)


def test_chunk_of_another_kv_dtype_is_refused(tmp_path):
    """A release that says fp8 but whose shard holds model-dtype KV (chunks of two builds mixed)."""
    write_release(tmp_path, some_chunks(2), kv_dtype="model", manifest_kv_dtype="fp8")
    store = Store.open(tmp_path)
    with pytest.raises(CorruptShardError, match="holds float32 KV but release .* is a fp8 store"):
        store.read("c0000")


def test_store_pins_release_while_newer_published(tmp_path):
    old_chunks = some_chunks(4, prefix="old")
    r1, _ = write_release(tmp_path, old_chunks)
    s1 = Store.open(tmp_path)
    s1.read("old0000")  # opens a shard handle before the publish
    new_chunks = some_chunks(3, seed0=100, prefix="new")
    r2, _ = write_release(tmp_path, new_chunks)
    assert r2 != r1 and read_current(tmp_path) == r2
    assert s1.release == r1
    for cid, (kv, tok, sal) in old_chunks.items():
        got = s1.read(cid)
        assert same_bytes(got.kv, kv) and same_bytes(got.tokens, tok) and same_bytes(got.saliency, sal)
    s2 = Store.open(tmp_path)
    assert s2.release == r2 and "new0100" in s2 and "old0001" not in s2
    assert s2.manifest["parent"] == r1
    assert Store.open(tmp_path, release=r1).release == r1


# ---- model checks -----------------------------------------------------------------------


def test_check_model_mismatch(tmp_path):
    write_release(tmp_path, some_chunks(2))
    store = Store.open(tmp_path)
    with pytest.raises(ModelMismatchError) as e:
        store.check_model("fp-other-bbbb", "float32")
    assert FP in str(e.value) and "fp-other-bbbb" in str(e.value)
    with pytest.raises(ModelMismatchError) as e:
        store.check_model(FP, torch.bfloat16)
    assert "float32" in str(e.value) and "bfloat16" in str(e.value)


# ---- corruption ----------------------------------------------------------------------------


def _two_releases(tmp_path):
    """An old release in its own shards, then a new one whose shards get damaged."""
    old = some_chunks(3, prefix="old")
    r_old, _ = write_release(tmp_path, old)
    new = some_chunks(3, seed0=50, prefix="new")
    r_new, shards = write_release(tmp_path, new, target_bytes=1 << 20)  # one shard
    (shard,) = set(shards.values())
    return old, r_old, r_new, shard


def _assert_old_reads(tmp_path, r_old, old):
    s = Store.open(tmp_path, release=r_old)
    for cid, (kv, tok, sal) in old.items():
        got = s.read(cid)
        assert same_bytes(got.kv, kv) and same_bytes(got.tokens, tok) and same_bytes(got.saliency, sal)


def test_truncated_shard(tmp_path):
    old, r_old, r_new, shard = _two_releases(tmp_path)
    path = tmp_path / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 40)
    store = Store.open(tmp_path)
    assert store.release == r_new
    with pytest.raises(CorruptShardError) as e:
        store.read("new0051")
    assert shard in str(e.value) and "new0051" in str(e.value)
    _assert_old_reads(tmp_path, r_old, old)


def test_bit_flip_fails_checksum(tmp_path):
    old, r_old, r_new, shard = _two_releases(tmp_path)
    path = tmp_path / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start, end = header[fmt.kv_name("new0051")]["data_offsets"]
    pos = 8 + n + (start + end) // 2
    data[pos] ^= 0x04
    path.write_bytes(bytes(data))
    store = Store.open(tmp_path)
    store.read("new0050")  # other chunks of the shard are fine
    with pytest.raises(CorruptShardError) as e:
        store.read("new0051")
    msg = str(e.value)
    assert "checksum" in msg and shard in msg and "new0051" in msg
    store.read("new0051", verify=False)  # without verification it reads (wrong) bytes
    _assert_old_reads(tmp_path, r_old, old)


def test_missing_shard(tmp_path):
    old, r_old, r_new, shard = _two_releases(tmp_path)
    (tmp_path / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}").unlink()
    store = Store.open(tmp_path)
    with pytest.raises(CorruptShardError) as e:
        store.read("new0052")
    assert shard in str(e.value) and "new0052" in str(e.value)
    _assert_old_reads(tmp_path, r_old, old)


# ---- unknown names ----------------------------------------------------------------------------


def test_unknown_release_and_chunk(tmp_path):
    with pytest.raises(NoReleaseError):
        Store.open(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(NoReleaseError, match=f"--cache {tmp_path / 'empty'}`"):   # the folder's own path
        Store.open(tmp_path / "empty")
    write_release(tmp_path, some_chunks(2))
    with pytest.raises(NoReleaseError):
        Store.open(tmp_path, release="r9999-nothere")
    write_release(tmp_path / "outer" / "cache", some_chunks(1))
    with pytest.raises(NoReleaseError, match="did you mean .*outer/cache") as above:   # the folder above a cache
        Store.open(tmp_path / "outer")
    assert "build-cache" not in str(above.value)            # not: build a second cache in the wrong folder
    store = Store.open(tmp_path)
    with pytest.raises(UnknownChunkError) as e:
        store.read("deadbeef")
    assert "deadbeef" in str(e.value)
    with pytest.raises(KeyError):
        store.record("deadbeef")


# ---- unsafe paths -------------------------------------------------------------------------------


def test_manifest_index_outside(tmp_path):
    cache = tmp_path / "cache"
    release, _ = write_release(cache, some_chunks(2))
    m = read_manifest(cache, release)
    (tmp_path / "outside.parquet").write_bytes((cache / m["index"]).read_bytes())
    m["index"] = "../outside.parquet"
    write_manifest(cache, m)  # a consistent edit (digest rewritten too): the path rule still refuses it
    with pytest.raises(UnsafePathError):
        Store.open(cache)
    m["index"] = str(tmp_path / "outside.parquet")  # absolute path
    write_manifest(cache, m)
    with pytest.raises(UnsafePathError):
        Store.open(cache)
    (cache / fmt.RELEASES_DIR / f"{release}.json").write_text(json.dumps(m))  # an edit without the digest
    with pytest.raises(StoreError, match="does not match its digest"):
        Store.open(cache)


def test_index_row_shard_outside(tmp_path):
    import pyarrow.parquet as pq

    release, _ = write_release(tmp_path, some_chunks(2))
    m = json.loads((tmp_path / fmt.RELEASES_DIR / f"{release}.json").read_text())
    ipath = tmp_path / m["index"]
    table = pq.read_table(ipath)
    rows = table.to_pylist()
    rows[1]["shard"] = "../../etc/x"
    m["index_digest"] = write_index(ipath, rows).as_dict()
    write_manifest(tmp_path, m)
    with pytest.raises(UnsafePathError):
        Store.open(tmp_path)


def test_unsafe_release_name(tmp_path):
    write_release(tmp_path, some_chunks(2))
    with pytest.raises(UnsafePathError):
        Store.open(tmp_path, release="../releases/x")


# ---- crash ------------------------------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from kvfuse.loader.writer import ShardWriter, init_cache_dir, publish_release
    cache = Path(sys.argv[1]); marker = Path(sys.argv[2])
    init_cache_dir(cache)
    w = ShardWriter(cache, metadata={"format_version": "1"}, target_bytes=1)
    for i in range(100):
        g = torch.Generator().manual_seed(1000 + i)
        w.add(f"crash{i:04d}", torch.randn(2, 2, 2, 4, 4, generator=g),
              torch.arange(4, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.float16))
        if i == 4:
            # a shard mid-write, as save_file leaves it before the rename
            tmp = cache / "shards" / f".s-torn.safetensors.{12345}.tmp"
            tmp.write_bytes(b"\\x10\\x00\\x00\\x00\\x00\\x00\\x00\\x00{\\"trunc")
            marker.write_text("ok")
            time.sleep(120)
    publish_release(cache, [], {"model": {}, "prefix": {}, "params": {}})
    """
)


def test_killed_writer_leaves_previous_release(tmp_path):
    cache = tmp_path / "cache"
    old = some_chunks(3, prefix="old")
    r_old, _ = write_release(cache, old)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(cache), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never reached its marker"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert read_current(cache) == r_old
    _assert_old_reads(cache, r_old, old)
    assert list((cache / fmt.SHARDS_DIR).glob(".*.tmp"))
    assert remove_stale_tmp(cache) >= 1
    assert not list((cache / fmt.SHARDS_DIR).glob(".*.tmp"))

    found = {cid for sums in scan_shards(cache).values() for cid in sums["chunks"]}
    crashed = {cid for cid in found if cid.startswith("crash")}
    assert crashed == {f"crash{i:04d}" for i in range(5)}  # one shard per chunk, all flushed
    assert {cid for cid in found if cid.startswith("old")} == set(old)

    # a rerun skips what is on disk and publishes; the old release stays readable
    rest = {cid: make_chunk(1000 + int(cid[5:]), 4) for cid in [f"crash{i:04d}" for i in range(8)] if cid not in found}
    assert set(rest) == {f"crash{i:04d}" for i in range(5, 8)}
    r_new, _ = write_release(cache, rest)
    assert read_current(cache) == r_new
    _assert_old_reads(cache, r_old, old)


def test_scan_shards_ignores_garbage(tmp_path):
    _, shards = write_release(tmp_path, some_chunks(3))
    (tmp_path / fmt.SHARDS_DIR / "s-garbage.safetensors").write_bytes(os.urandom(100))
    (tmp_path / fmt.SHARDS_DIR / "s-empty.safetensors").write_bytes(b"")
    found = scan_shards(tmp_path)
    assert {cid: shard for shard, sums in found.items() for cid in sums["chunks"]} == shards
    assert scan_shards(tmp_path / "nothing") == {}


def test_rerun_rewrites_corrupt_shard_of_same_name(tmp_path):
    chunks = some_chunks(3)
    _, shards = write_release(tmp_path, chunks, target_bytes=1 << 20)
    (shard,) = set(shards.values())
    path = tmp_path / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}"
    path.write_bytes(path.read_bytes()[:50])  # torn
    sums = scan_shards(tmp_path)[shard]
    with pytest.raises(StoreError, match=shard):  # its chunks must be recomputed...
        verify_leftover(tmp_path, shard, sums, list(chunks))
    r, shards2 = write_release(tmp_path, chunks, target_bytes=1 << 20)
    assert set(shards2.values()) == {shard}  # ...into a shard of the same name, which is rewritten
    store = Store.open(tmp_path)
    for cid, (kv, tok, sal) in chunks.items():
        got = store.read(cid)
        assert same_bytes(got.kv, kv) and same_bytes(got.tokens, tok) and same_bytes(got.saliency, sal)
