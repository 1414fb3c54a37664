"""Isolated chunks of one length prefilled in one batched forward (pipeline/precompute.py:
prefill_chunks and embed_chunks, the GPU build's paths) give each chunk's KV, saliency and
embedding as a prefill of it alone does; compute_jobs groups only consecutive isolated chunks
of one length, embed_items chunks of one length."""

import pytest
import torch
from conftest import tiny_model_dir

from kvfuse.pipeline.build import Job, job_batches
from kvfuse.pipeline.isolated_kv import IsolatedKV
from kvfuse.pipeline.precompute import embed_chunk, embed_chunks, prefill_chunk, prefill_chunks, prefill_prefix
from kvfuse.runtime.model import load_model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory)))


def test_batched_chunks_equal_each_chunk_alone(lm):
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, 60, (6,), generator=g).tolist()
    chunks = [torch.randint(5, 60, (12,), generator=g).tolist() for _ in range(3)]
    prefix_kv = prefill_prefix(lm, prefix)
    batched = prefill_chunks(lm, prefix_kv, chunks)
    for ids, (kv, sal) in zip(chunks, batched):
        want_kv, want_sal = prefill_chunk(lm, prefix_kv, ids)
        assert kv.shape == want_kv.shape and sal.dtype == want_sal.dtype == torch.float16
        torch.testing.assert_close(kv, want_kv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sal.float(), want_sal.float(), atol=1e-3, rtol=1e-3)
        assert sal[0].abs().sum() > 0   # attn_received measured for every sequence of the batch
    with pytest.raises(ValueError, match="one length"):
        prefill_chunks(lm, prefix_kv, [chunks[0], chunks[1][:5]])


def test_only_consecutive_isolated_chunks_of_one_length_are_grouped():
    def job(n, tag, neighbours=(), prefix=False):
        return Job(tag, tuple(range(n)), tuple(neighbours), prefix)
    jobs = [job(4, "p", prefix=True), job(8, "a"), job(8, "b"), job(8, "c"), job(5, "d"), job(8, "e"),
            job(8, "f", neighbours=(1, 2)), job(8, "g"), job(8, "h")]
    groups = [[j.chunk_id for j in grp] for grp in job_batches(jobs, 2)]
    assert groups == [["p"], ["a", "b"], ["c"], ["d"], ["e"], ["f"], ["g", "h"]]
    assert [[j.chunk_id for j in grp] for grp in job_batches(jobs, 1)] == [[j.chunk_id] for j in jobs]


def test_batched_embeddings_equal_each_chunk_alone_and_keep_each_isolated_kv(lm):
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(5, 60, (6,), generator=g).tolist()
    chunks = [torch.randint(5, 60, (10,), generator=g).tolist() for _ in range(3)]
    prefix_kv = prefill_prefix(lm, prefix)
    keep = IsolatedKV(max_bytes=1 << 30)
    embs = embed_chunks(lm, prefix_kv, chunks, keep, prefix)                      # [3, hidden]
    for ids, emb in zip(chunks, embs):
        torch.testing.assert_close(emb, embed_chunk(lm, prefix_kv, ids), atol=1e-5, rtol=1e-5)
        want_kv, _ = prefill_chunk(lm, prefix_kv, ids)
        torch.testing.assert_close(keep.take(lm, prefix, ids).cpu(), want_kv, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one length"):
        embed_chunks(lm, prefix_kv, [chunks[0], chunks[1][:5]])


def test_length_groups_are_consecutive_items_of_one_length():
    from kvfuse.pipeline.build import length_groups
    items = [8, 8, 8, 5, 8, 8]
    assert length_groups(items, lambda n: n, 2) == [[8, 8], [8], [5], [8, 8]]
    assert length_groups(items, lambda n: n, 1) == [[n] for n in items]
    assert length_groups([], lambda n: n, 4) == []
