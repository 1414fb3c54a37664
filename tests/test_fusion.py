"""Fusion invariants (DESIGN §4) on a tiny random model; the same on the real model in test_end_to_end."""

import pytest
import torch
from conftest import tiny_model_dir

from kvfuse.loader.store import ChunkData
from kvfuse.pipeline.precompute import prefill_chunk, prefill_prefix
from kvfuse.runtime.attention import use_kvfuse_attention
from kvfuse.runtime.fusion import full_prefill, fuse, greedy
from kvfuse.runtime.kvcache import kv_from_cache
from kvfuse.runtime.model import cache_kwargs, load_model
from kvfuse.runtime.rope import rerotate_keys
from kvfuse.runtime.selectors import SELECTORS


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm(request, tmp_path_factory):
    lm = load_model(str(tiny_model_dir(tmp_path_factory, arch=request.param)))
    use_kvfuse_attention(lm.model)
    return lm


def make_chunks(lm, prefix_ids, chunk_token_lists, stored_at=None):
    prefix_kv = prefill_prefix(lm, prefix_ids)
    prefix = ChunkData("prefix", prefix_kv, torch.tensor(prefix_ids, dtype=torch.int32), torch.zeros(2, len(prefix_ids)), 0)
    chunks = []
    for i, toks in enumerate(chunk_token_lists):
        kv, sal = prefill_chunk(lm, prefix_kv, toks)
        chunks.append(ChunkData(f"c{i}", kv, torch.tensor(toks, dtype=torch.int32), sal, len(prefix_ids)))
    return prefix, chunks


def test_ratio_one_matches_full_prefill(lm):
    g = torch.Generator().manual_seed(0)
    prefix_ids = [2, 10, 11, 12]
    chunk_lists = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (17, 9, 23)]
    question = torch.randint(5, 100, (6,), generator=g)
    prefix, chunks = make_chunks(lm, prefix_ids, chunk_lists)
    all_ids = torch.tensor(prefix_ids + sum(chunk_lists, []) + question.tolist())
    ref_cache, ref_logits = full_prefill(lm, all_ids)
    ref_kv = kv_from_cache(ref_cache)
    n = len(all_ids)
    ref_tokens = greedy(lm, ref_cache, ref_logits, n, 8)
    checked = 0
    for name in SELECTORS:
        res = fuse(lm, prefix, chunks, question, name, 1.0)
        if res.n_recomputed < res.layout.context_len:
            continue  # e.g. reuse, or epic whose "first k per chunk" can't cover unequal chunks
        checked += 1
        assert (res.logits - ref_logits).abs().max() < 1e-3, name
        assert torch.allclose(kv_from_cache(res.cache), ref_kv, atol=1e-4), name
        assert greedy(lm, res.cache, res.logits, n, 8) == ref_tokens, name
    assert checked >= 3  # full, a3, qattn at least


def test_ratio_zero_single_chunk_is_prefix_caching(lm):
    prefix_ids, chunk = [2, 10, 11], list(range(20, 45))
    question = torch.tensor([50, 51, 52, 53])
    prefix, chunks = make_chunks(lm, prefix_ids, [chunk])
    # Plain prefix caching: prefill prefix, then the chunk over it, then the question over that.
    from kvfuse.runtime.kvcache import cache_from_kv
    cache = cache_from_kv(torch.cat((prefix.kv, chunks[0].kv), dim=3))
    with torch.inference_mode():
        ref = lm.model(input_ids=question[None], **cache_kwargs(lm.model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
    res = fuse(lm, prefix, chunks, question, "reuse", 0.0)
    assert torch.equal(res.logits, ref.float())
    assert res.n_recomputed == 0


def test_rerotated_keys_equal_keys_computed_at_new_position(lm):
    ids = list(range(20, 40))
    with torch.inference_mode():
        from transformers.cache_utils import DynamicCache
        def keys_at(start):
            cache = DynamicCache()
            pos = torch.arange(start, start + len(ids))[None]
            lm.model.model(input_ids=torch.tensor([ids]), position_ids=pos, **cache_kwargs(lm.model.model, cache), use_cache=True)
            return kv_from_cache(cache)[:, 0]  # [L, H_kv, T, D]
        k0, k1 = keys_at(3), keys_at(517)
    moved = rerotate_keys(k0, 514, lm.rope_inv_freq())
    assert ((moved - k1).norm() / k1.norm()) < 1e-4


def test_budget_respected_and_question_always_recomputed(lm):
    g = torch.Generator().manual_seed(1)
    chunk_lists = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (30, 30)]
    prefix, chunks = make_chunks(lm, [2, 10], chunk_lists)
    question = torch.tensor([60, 61, 62])
    for name in ("epic", "a3", "qattn"):
        res = fuse(lm, prefix, chunks, question, name, 0.2)
        assert res.n_recomputed <= 12, name
        assert res.recomputed.numel() == res.recomputed.unique().numel()
        assert ((res.recomputed >= 2) & (res.recomputed < 62)).all()
        # the question's K/V are fresh: the cache holds all positions
        assert res.cache.get_seq_length() == res.layout.total_len
        again = fuse(lm, prefix, chunks, question, name, 0.2)
        assert torch.equal(again.recomputed, res.recomputed)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "grouped", "split"])
def test_recompute_attention_backends_equal_dense_mask(lm, backend, monkeypatch):
    """Every backend of the scattered-query attention computes the dense-mask path's function
    (`split` with groups and prefixes small enough for this tiny prompt)."""
    from kvfuse.runtime import recompute_attention
    from kvfuse.runtime.fusion import prepare, run
    monkeypatch.setattr(recompute_attention, "FLEX_BLOCK", 8)
    monkeypatch.setattr(recompute_attention, "SPLIT_GROUP_ROWS", 8)
    monkeypatch.setattr(recompute_attention, "SPLIT_MIN_PREFIX", 8)
    g = torch.Generator().manual_seed(3)
    chunk_lists = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (40, 25, 33)]
    prefix, chunks = make_chunks(lm, [2, 10, 11], chunk_lists)
    prep = prepare(lm, prefix, chunks, torch.tensor([60, 61, 62, 63]))
    C = prep.layout.context_len
    selected = torch.randperm(C, generator=g)[: C // 3].sort().values + prep.layout.prefix_len
    want = run(prep, "full", 0.3, selected=selected, attention="dense")
    got = run(prep, "full", 0.3, selected=selected, attention=backend, groups=3 if backend == "grouped" else None)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(kv_from_cache(got.cache), kv_from_cache(want.cache), atol=1e-4, rtol=0)


def _narrowing_case(lm, seed=3):
    from kvfuse.runtime.fusion import prepare
    from kvfuse.runtime.selectors import LayerPlan
    g = torch.Generator().manual_seed(seed)
    chunk_lists = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (40, 25, 33)]
    prefix, chunks = make_chunks(lm, [2, 10, 11], chunk_lists)
    prep = prepare(lm, prefix, chunks, torch.tensor([60, 61, 62, 63]))
    C = prep.layout.context_len
    initial = torch.randperm(C, generator=g)[: C // 2].sort().values + prep.layout.prefix_len
    keep = [initial.numel()] + [initial.numel() // 3] * (lm.spec.n_layers - 1)
    return prep, LayerPlan(initial=initial, keep=keep, pinned=initial[:2])


@pytest.mark.parametrize("backend", ["sdpa", "flex", "grouped"])
def test_narrowing_plan_backends_equal_dense_mask(lm, backend):
    """A plan that narrows inside the pass: every backend keeps the same tokens and computes the
    dense-mask path's cache and logits (the narrowed layers attend a new query set)."""
    from kvfuse.runtime.fusion import run
    prep, plan = _narrowing_case(lm)
    want = run(prep, "full", 0.3, selected=plan, attention="dense")
    got = run(prep, "full", 0.3, selected=plan, attention=backend, groups=3 if backend == "grouped" else None)
    assert torch.equal(got.kept, want.kept) and got.kept.numel() == plan.keep[-1]
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(kv_from_cache(got.cache), kv_from_cache(want.cache), atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_narrowing_plan_flex_equals_dense(tmp_path_factory):
    """On CUDA (FlexAttention compiled, bf16): the narrowing pass keeps the dense path's tokens,
    logits within bf16 tolerance."""
    from kvfuse.runtime.fusion import run
    lm = load_model(str(tiny_model_dir(tmp_path_factory, arch="qwen2")), device="cuda", dtype="bfloat16")
    use_kvfuse_attention(lm.model)
    prep, plan = _narrowing_case(lm)
    want = run(prep, "full", 0.3, selected=plan, attention="dense")
    got = run(prep, "full", 0.3, selected=plan, attention="flex")
    assert torch.equal(got.kept, want.kept)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-2, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_split_recompute_equals_dense(tmp_path_factory, monkeypatch):
    """On CUDA a pass of more than SMALL_PASS_ROWS queries runs `split` by default (cuDNN over
    each group's common key prefix + flex over the band, merged): the dense path's logits and
    K/V within bf16 tolerance. ~3,000 context tokens, 1,500 picked: several groups, with prefixes."""
    from kvfuse.runtime import recompute_attention
    from kvfuse.runtime.fusion import prepare, run
    for name in ("KVFUSE_RECOMPUTE_ATTENTION", "KVFUSE_LARGE_PASS_ATTENTION", "KVFUSE_SMALL_PASS_ROWS"):
        monkeypatch.delenv(name, raising=False)
    lm = load_model(str(tiny_model_dir(tmp_path_factory, arch="qwen2", max_position_embeddings=4096)),
                    device="cuda", dtype="bfloat16")
    use_kvfuse_attention(lm.model)
    g = torch.Generator().manual_seed(8)
    prefix, chunks = make_chunks(lm, [2, 10, 11], [torch.randint(5, 100, (500,), generator=g).tolist()
                                                   for _ in range(6)])
    prep = prepare(lm, prefix, chunks, torch.tensor([60, 61, 62, 63]))
    C = prep.layout.context_len
    selected = torch.randperm(C, generator=g)[:1500].sort().values + prep.layout.prefix_len
    used = []
    real = recompute_attention.ScatteredQueries._split
    monkeypatch.setattr(recompute_attention.ScatteredQueries, "_split", lambda *a: used.append(1) or real(*a))
    want = run(prep, "full", 0.5, selected=selected, attention="dense")
    got = run(prep, "full", 0.5, selected=selected)
    assert used, "the default backend of a 1,504-row pass on CUDA is split"
    torch.testing.assert_close(got.logits, want.logits, atol=3e-2, rtol=0)
    torch.testing.assert_close(kv_from_cache(got.cache).float(), kv_from_cache(want.cache).float(), atol=3e-2,
                               rtol=0)


def test_recompute_builds_no_dense_float_mask(lm, monkeypatch):
    """The kvfuse attention attends scattered queries without the [S+Q, K] float mask (issue 11)."""
    from kvfuse.runtime import fusion, recompute_attention
    g = torch.Generator().manual_seed(4)
    prefix, chunks = make_chunks(lm, [2, 10], [torch.randint(5, 100, (30,), generator=g).tolist() for _ in range(2)])
    made = []
    real = recompute_attention.ScatteredQueries.float_mask
    monkeypatch.setattr(recompute_attention.ScatteredQueries, "float_mask", lambda *a: made.append(1) or real(*a))
    monkeypatch.setattr(fusion, "_recompute_mask", lambda *a: pytest.fail("dense mask built"))
    for name in ("a3", "prophet", "kvfuse", "cacheblend"):
        fuse(lm, prefix, chunks, torch.tensor([60, 61, 62]), name, 0.3)
    assert not made


def test_flex_block_mask_matches_positions():
    from kvfuse.runtime.recompute_attention import flex_block_mask
    positions = torch.tensor([5, 10, 300, 301, 302])
    blocks = flex_block_mask(positions, 400, block=2).to_dense()[0, 0]       # [q blocks, kv blocks]
    # q block 0 (positions 5, 10) reaches key block 5 (keys 10, 11); q block 2 (302, pad) key block 151
    assert blocks[0].nonzero().max() == 5 and blocks[0, :6].all()
    assert blocks[2].nonzero().max() == 151 and blocks[2, :152].all()


@pytest.mark.parametrize("rows", [5, 700])
def test_split_attention_equals_masked_sdpa(rows):
    """`split` (each group's common key prefix unmasked + the band after it, merged by
    log-sum-exp) is the masked attention: grouped-query heads, groups with and without a
    prefix, a last group shorter than the others."""
    from kvfuse.runtime.recompute_attention import ScatteredQueries, split_groups
    g = torch.Generator().manual_seed(7)
    n_keys = 3000
    positions = torch.randperm(n_keys - 40, generator=g)[:rows].sort().values
    positions = torch.cat((positions, torch.arange(n_keys - 40, n_keys)))           # + a 40-token question
    q = torch.randn(1, 4, positions.numel(), 16, generator=g)
    k, v = torch.randn(2, 1, 2, n_keys, 16, generator=g)
    groups = split_groups(positions)
    assert rows < 100 or (any(p for *_, p in groups) and not all(p for *_, p in groups))
    want = ScatteredQueries(positions, n_keys, "sdpa").attend(None, q, k, v, 0.25)
    got = ScatteredQueries(positions, n_keys, "split", host_positions=positions).attend(None, q, k, v, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    again = ScatteredQueries(positions, n_keys, "split").attend(None, q, k, v, 0.25)   # host positions copied
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_of_unordered_rows():
    """Rows in any order (grouped-query heads packed into rows restart at each head): a block
    is bounded by its lowest and highest position, not its first and last row."""
    from kvfuse.runtime.recompute_attention import flex_block_mask
    blocks = flex_block_mask(torch.tensor([300, 5, 10, 301]), 400, block=2).to_dense()[0, 0]
    assert blocks[0].nonzero().max() == 150 and blocks[0, :151].all()   # rows 300 and 5: keys up to 300
    assert blocks[1].nonzero().max() == 150 and blocks[1, :151].all()   # rows 10 and 301


def test_concurrent_fusions_on_threads_match_sequential(lm):
    """The attention's pass state is per thread: an engine may fuse on several threads at once."""
    from concurrent.futures import ThreadPoolExecutor
    g = torch.Generator().manual_seed(5)
    prompts = []
    for n in (2, 3, 4):
        prefix, chunks = make_chunks(lm, [2, 10], [torch.randint(5, 100, (20 + 3 * n,), generator=g).tolist()
                                                   for _ in range(n)])
        prompts.append((prefix, chunks, torch.randint(5, 100, (3 + n,), generator=g)))
    want = [fuse(lm, *p, "prophet", 0.3) for p in prompts]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            got = list(pool.map(lambda p: fuse(lm, *p, "prophet", 0.3), prompts))
            for w, r in zip(want, got):
                assert torch.equal(w.recomputed, r.recomputed)
                torch.testing.assert_close(r.logits, w.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("selector", ["kvfuse-gradual", "kvfuse-gradual-full"])
def test_layer_plan_through_layerwise_load_matches_host_path(tmp_path_factory, selector):
    """The narrowing pass over the tiers' streamed cache (`layerwise.fuse_layerwise`, the GPU
    serving path, here on the CPU): the host path's selection and logits (test_layerwise's check)."""
    from test_layerwise import test_selection_matches_plain_fuse
    test_selection_matches_plain_fuse(tmp_path_factory, selector)


def test_cuda_attention_backend_by_pass_size(monkeypatch):
    """On CUDA a pass of at most SMALL_PASS_ROWS queries runs `sdpa` (cuDNN with a boolean mask),
    a larger one `split`; the CPU runs `sdpa`; the environment overrides each, a wrong name is a
    clear error."""
    from kvfuse.runtime import recompute_attention
    from kvfuse.runtime.recompute_attention import default_backend
    for name in ("KVFUSE_RECOMPUTE_ATTENTION", "KVFUSE_SMALL_PASS_ATTENTION", "KVFUSE_LARGE_PASS_ATTENTION",
                 "KVFUSE_SMALL_PASS_ROWS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(recompute_attention, "_flex_failed", None)
    limit = recompute_attention.SMALL_PASS_ROWS
    assert default_backend("cuda", 164) == default_backend("cuda", limit) == "sdpa"
    assert default_backend("cuda", limit + 1) == "split" and default_backend("cpu", 5000) == "sdpa"
    monkeypatch.setenv("KVFUSE_LARGE_PASS_ATTENTION", "flex")
    assert default_backend("cuda", limit + 1) == "flex"
    monkeypatch.setenv("KVFUSE_SMALL_PASS_ATTENTION", "flex")      # each variable means its own setting
    assert default_backend("cuda", 164) == "flex"
    monkeypatch.setenv("KVFUSE_LARGE_PASS_ATTENTION", "bogus")
    for device in ("cuda", "cpu"):                                  # checked on every device
        with pytest.raises(ValueError, match="KVFUSE_LARGE_PASS_ATTENTION='bogus'"):
            default_backend(device, limit + 1)
    monkeypatch.delenv("KVFUSE_LARGE_PASS_ATTENTION")
    monkeypatch.setenv("KVFUSE_SMALL_PASS_ROWS", "abc")
    with pytest.raises(ValueError, match="KVFUSE_SMALL_PASS_ROWS='abc'"):
        default_backend("cpu", 10)


def test_split_without_cudnn_gives_way_to_flex(monkeypatch):
    """Where cuDNN's attention cannot run (CudnnUnavailable), a `split` pass warns, computes the same
    attention through flex, and later large passes choose flex: no float32 fallback over long prefixes."""
    from kvfuse.runtime import recompute_attention
    from kvfuse.runtime.recompute_attention import CudnnUnavailable, ScatteredQueries, default_backend

    def unavailable(*args, **kwargs):
        raise CudnnUnavailable("cuDNN attention with log-sum-exp is not available (test)")

    monkeypatch.setattr(recompute_attention, "_split_failed", None)
    monkeypatch.setattr(recompute_attention, "attention_with_lse", unavailable)
    for name in ("KVFUSE_RECOMPUTE_ATTENTION", "KVFUSE_LARGE_PASS_ATTENTION", "KVFUSE_SMALL_PASS_ROWS"):
        monkeypatch.delenv(name, raising=False)
    g = torch.Generator().manual_seed(9)
    n_keys = 3000
    positions = torch.cat((torch.randperm(n_keys - 40, generator=g)[:700].sort().values,
                           torch.arange(n_keys - 40, n_keys)))
    q = torch.randn(1, 4, positions.numel(), 16, generator=g)
    k, v = torch.randn(2, 1, 2, n_keys, 16, generator=g)
    want = ScatteredQueries(positions, n_keys, "sdpa").attend(None, q, k, v, 0.25)
    sq = ScatteredQueries(positions, n_keys, "split", host_positions=positions)
    with pytest.warns(UserWarning, match="run flex attention"):
        got = sq.attend(None, q, k, v, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sq.backend == "flex" and default_backend("cuda", 5000) == "flex"
