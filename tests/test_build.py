"""build-cache on a tiny random model: bad input, resume after SIGKILL, model mismatch, and the
write path (staging, shard-writer threads, kept isolated pass) storing what the sequential one did."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model_dir

from kvfuse.loader import format as fmt
from kvfuse.loader.errors import ModelMismatchError
from kvfuse.loader.store import Store, read_current
from kvfuse.loader.writer import ShardWriter
from kvfuse.pipeline import build
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.pipeline.corpus import CorpusError
from kvfuse.pipeline.isolated_kv import ISOLATED_KV
from kvfuse.pipeline.precompute import prefill_chunk, prefill_prefix
from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.model import load_model
from kvfuse.runtime.prompt import PromptTemplate

WORDS = "the city is the capital of the country and the river is red".split()


def corpus(path, n_docs=4, words=60):
    import random
    rng = random.Random(0)  # random words: no two chunks identical (identical chunks dedupe)
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(WORDS) for j in range(words))
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def test_build_then_ask_and_rebuild_reuses(tmp_path, model_dir):
    lm = load_model(str(model_dir))
    cfg = BuildConfig(chunk_tokens=16, progress=False)
    r1 = build_cache(corpus(tmp_path / "c.jsonl"), tmp_path / "cache", lm, cfg)
    assert r1.computed == r1.chunks > 4
    r2 = build_cache(tmp_path / "c.jsonl", tmp_path / "cache", lm, cfg)
    assert r2.computed == 0 and r2.reused == r1.chunks
    engine = FusionEngine(tmp_path / "cache", lm)
    a = engine.ask("what is the capital", top_k=2, ratio=0.5, max_new_tokens=3, compare=True)
    assert a.n_recomputed > 0 and a.full_text is not None


def test_long_document_is_chunked_not_dropped(tmp_path, model_dir):
    lm = load_model(str(model_dir))  # max_position_embeddings 1024
    r = build_cache(corpus(tmp_path / "c.jsonl", n_docs=1, words=3000), tmp_path / "cache", lm,
                    BuildConfig(chunk_tokens=64, progress=False))
    sep = len(PromptTemplate.of(lm.tokenizer).separator_ids(lm.tokenizer))  # every chunk starts with it
    assert sum(rec.n_tokens - sep for rec in Store.open(tmp_path / "cache").records()) == 3000


def test_empty_and_non_utf8_corpus_errors_keep_release(tmp_path, model_dir):
    lm = load_model(str(model_dir))
    build_cache(corpus(tmp_path / "c.jsonl"), tmp_path / "cache", lm, BuildConfig(chunk_tokens=16, progress=False))
    before = read_current(tmp_path / "cache")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CorpusError, match="no documents"):
        build_cache(tmp_path / "empty.jsonl", tmp_path / "cache", lm, BuildConfig(progress=False))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match="a.txt"):
        build_cache(tmp_path / "bad", tmp_path / "cache", lm, BuildConfig(progress=False))
    assert read_current(tmp_path / "cache") == before


def test_other_model_is_refused_naming_both_fingerprints(tmp_path, tmp_path_factory, model_dir):
    lm = load_model(str(model_dir))
    build_cache(corpus(tmp_path / "c.jsonl"), tmp_path / "cache", lm, BuildConfig(chunk_tokens=16, progress=False))
    other = load_model(str(tiny_model_dir(tmp_path_factory, seed=1)))
    with pytest.raises(ModelMismatchError) as e:
        FusionEngine(tmp_path / "cache", other)
    assert lm.spec.fingerprint in str(e.value) and other.spec.fingerprint in str(e.value)
    with pytest.raises(ModelMismatchError):
        build_cache(tmp_path / "c.jsonl", tmp_path / "cache", other, BuildConfig(chunk_tokens=16, progress=False))


SCRIPT = """
import sys, time
from kvfuse.pipeline import build as b
from kvfuse.runtime.model import load_model
from kvfuse.loader import writer as w
orig = w.ShardWriter.flush
count = [0]
def flush(self):
    out = orig(self)
    count[0] += 1
    if count[0] == 2:
        open(sys.argv[4], "w").write("x"); time.sleep(60)
    return out
w.ShardWriter.flush = flush
lm = load_model(sys.argv[1])
b.build_cache(sys.argv[2], sys.argv[3], lm, b.BuildConfig(chunk_tokens=16, shard_bytes=1, progress=False))
"""


def test_sigkill_mid_build_keeps_previous_release_and_rerun_completes(tmp_path, model_dir):
    lm = load_model(str(model_dir))
    cache = tmp_path / "cache"
    build_cache(corpus(tmp_path / "c1.jsonl", n_docs=2), cache, lm, BuildConfig(chunk_tokens=16, progress=False))
    before = read_current(cache)
    bigger = corpus(tmp_path / "c2.jsonl", n_docs=6)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(model_dir), str(bigger), str(cache), str(marker)])
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "the build never reached its second shard"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_current(cache) == before
    old = Store.open(cache)
    for rec in old.records():
        old.read(rec.chunk_id)
    report = build_cache(bigger, cache, lm, BuildConfig(chunk_tokens=16, progress=False))
    assert report.reused >= 2  # chunks written before the kill (and the old release's) are not recomputed
    fresh = tmp_path / "fresh"
    ref = build_cache(bigger, fresh, lm, BuildConfig(chunk_tokens=16, progress=False))
    new, clean = Store.open(cache), Store.open(fresh)
    assert {r.chunk_id for r in new.records()} == {r.chunk_id for r in clean.records()}
    for rec in clean.records():
        assert torch.equal(new.read(rec.chunk_id).kv, clean.read(rec.chunk_id).kv)


def sequential_compute_jobs(lm, prefix_ids, jobs, cache_dir, metadata, shard_bytes, **_):
    """The write path before issue 14: each chunk prefilled (its isolated pass rerun), copied to
    the host, checksummed and written by one ShardWriter, in turn."""
    prefix_kv = prefill_prefix(lm, prefix_ids)
    writer = ShardWriter(cache_dir, metadata, shard_bytes)
    for job in jobs:
        if job.is_prefix:
            kv, sal = prefix_kv, torch.zeros(len(fmt.SALIENCY_SIGNALS), len(job.token_ids))
        else:
            kv, sal = prefill_chunk(lm, prefix_kv, job.token_ids, job.neighbour_ids)
        writer.add(job.chunk_id, kv, torch.tensor(job.token_ids), sal)
    writer.flush()
    return writer.written


def assert_same_chunks(got: Store, want: Store) -> None:
    """Same chunks, index checksums, and byte-identical KV, tokens and saliency."""
    assert {r.chunk_id for r in got.records(include_prefix=True)} == {r.chunk_id for r in want.records(include_prefix=True)}
    for rec in want.records(include_prefix=True):
        a, b = got.read(rec.chunk_id), want.read(rec.chunk_id)
        assert got.record(rec.chunk_id).checksum == rec.checksum
        assert torch.equal(a.kv.view(torch.uint8), b.kv.view(torch.uint8))
        assert torch.equal(a.saliency.view(torch.uint8), b.saliency.view(torch.uint8))
        assert torch.equal(a.tokens, b.tokens)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _CUDA])])
@pytest.mark.parametrize("enrich", [False, True], ids=["isolated", "enriched"])
@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_write_path_stores_the_bytes_of_the_sequential_one(tmp_path, model_dir, monkeypatch, enrich, device, kv_dtype):
    """The write path (staged copies, writer threads; on a GPU fp8 codes are made there) stores
    the bytes the sequential path (the writer encodes on the host) stores."""
    lm = load_model(str(model_dir), device=device)  # cuda: pinned staging, side-stream copies, events
    cfg = BuildConfig(chunk_tokens=16, progress=False, enrich=enrich, neighbour_tokens=40, kv_dtype=kv_dtype,
                      shard_bytes=40_000)  # ~5 chunks a shard: several shards, the last ones cut smaller
    docs = corpus(tmp_path / "c.jsonl", n_docs=4)
    with monkeypatch.context() as m:  # one chunk per forward, as the sequential path (batched: the next test)
        m.setattr(build, "GPU_BATCH", 1)
        new = build_cache(docs, tmp_path / "new", lm, cfg)
    assert len(ISOLATED_KV) == 0  # what the embedding pass kept was taken or dropped
    with monkeypatch.context() as m:
        m.setattr(build, "compute_jobs", sequential_compute_jobs)
        old = build_cache(docs, tmp_path / "old", lm, dataclasses.replace(cfg, isolated_kv_gb=0))
    got, want = Store.open(tmp_path / "new"), Store.open(tmp_path / "old")
    assert len(list((tmp_path / "new" / fmt.SHARDS_DIR).glob(f"*{fmt.SHARD_SUFFIX}"))) > 2
    assert_same_chunks(got, want)
    enriched_tokens = sum(r.n_tokens for r in got.records() if r.neighbours)
    assert (enriched_tokens > 0) == enrich
    assert new.computed == old.computed and old.prefilled - new.prefilled == enriched_tokens  # isolated pass run once


@pytest.mark.cuda
@_CUDA
def test_gpu_build_batches_isolated_chunks_to_the_same_kv(tmp_path, model_dir, monkeypatch):
    """On a GPU isolated chunks of one length go GPU_BATCH to a forward: the same chunks, with
    KV and saliency equal to one-chunk forwards up to rounding."""
    lm = load_model(str(model_dir), device="cuda")
    cfg = BuildConfig(chunk_tokens=16, progress=False, enrich=False)
    docs = corpus(tmp_path / "c.jsonl", n_docs=4)
    calls = []
    real = build.prefill_chunks
    with monkeypatch.context() as m:
        m.setattr(build, "prefill_chunks", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
        build_cache(docs, tmp_path / "batched", lm, cfg)
    with monkeypatch.context() as m:
        m.setattr(build, "GPU_BATCH", 1)
        build_cache(docs, tmp_path / "one", lm, cfg)
    assert calls and max(calls) == build.GPU_BATCH
    got, want = Store.open(tmp_path / "batched"), Store.open(tmp_path / "one")
    assert {r.chunk_id for r in got.records()} == {r.chunk_id for r in want.records()}
    for rec in want.records():
        a, b = got.read(rec.chunk_id), want.read(rec.chunk_id)
        torch.testing.assert_close(a.kv, b.kv, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.saliency.float(), b.saliency.float(), atol=1e-3, rtol=1e-3)


def test_build_cache_kv_dtype_fp8_and_inspect(tmp_path, model_dir):
    """`build-cache --kv-dtype fp8` stores codes + scales; `inspect` shows the dtype and bytes per token."""
    from click.testing import CliRunner
    from kvfuse.cli.main import main
    c = corpus(tmp_path / "c.jsonl")
    common = ["--model", str(model_dir), "--chunk-tokens", "16", "--no-enrich", "--in-process"]
    runner = CliRunner()
    for kv in ("model", "fp8"):
        res = runner.invoke(main, ["build-cache", str(c), "--cache", str(tmp_path / kv), *common, "--kv-dtype", kv])
        assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["inspect", str(tmp_path / "fp8")])
    assert res.exit_code == 0, res.output
    assert "kv_dtype: fp8" in res.output and "kv_bytes_per_token: " in res.output
    a, b = (Store.open(tmp_path / kv, lease=False).stats() for kv in ("model", "fp8"))
    assert a["kv_dtype"] == "model" and a["tokens"] == b["tokens"] and a["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    # tiny model (D = 16, chunks of <= 16 tokens): 1/4 of float32's bytes plus the scales
    assert 0.25 < b["kv_bytes"] / a["kv_bytes"] < 0.35
    res = runner.invoke(main, ["build-cache", str(c), "--cache", str(tmp_path / "x"), *common, "--kv-dtype", "fp4"])
    assert res.exit_code != 0 and "fp4" in res.output


@pytest.mark.parametrize("kv_dtype", ["model", "fp8", "int8"])
def test_shard_sizes_are_counted_in_the_bytes_the_writers_get(model_dir, kv_dtype):
    """The shard pool's bytes_after must be counted in what `_write_group` hands it: for a store
    encoded on the GPU, the codes and scales, not the model dtype's KV (else an fp8 task closes its
    first shard late and ends waiting for more unoverlapped writing)."""
    from kvfuse.loader.quant import kv_codec
    lm = load_model(str(model_dir))
    codec = kv_codec(kv_dtype)
    T = 512
    kv = torch.randn(lm.spec.n_layers, 2, lm.spec.n_kv_heads, T, lm.spec.head_dim).to(lm.spec.dtype)
    codes, scales = codec.encode(kv)
    handed = codes.numel() * codes.element_size() + (0 if scales is None else scales.numel() * scales.element_size())
    handed += T * 4 + len(fmt.SALIENCY_SIGNALS) * T * 2           # token ids (int32), saliency (float16)
    want = handed / T
    got = build.handed_bytes_per_token(lm, codec if codec.quantised else None, T)
    assert got == pytest.approx(want, rel=1e-6)
