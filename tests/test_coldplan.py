"""Cold loads never slower than a full prefill (issue 11 item 3): the cost model that decides,
per chunk in no pool, whether to load or recompute it, and the fused result when it recomputes."""

import pytest
import torch

from kvfuse.runtime.coldplan import ChunkLoad, LoadRates, cold_plan_notes, estimate_s, plan_cold
from kvfuse.runtime.fusion import full_prefill, greedy
from kvfuse.runtime.kvcache import cache_from_kv
from kvfuse.runtime.model import cache_kwargs
from kvfuse.runtime.layerwise import fuse_layerwise, layer_groups
from test_layerwise import P, T, plain_logits, question, setup, tiers_for

GB = 10**9


def chunks(*states, n_tokens=100, nbytes=GB):
    return [ChunkLoad(s, n_tokens, nbytes) for s in states]


def fused(n):   # tokens the fused pass runs over n context tokens: 20% of them + 10
    return 0.2 * n + 10


def test_slow_disk_runs_the_full_prefill():
    # 1 GB at 0.5 GB/s = 2 s per chunk from disk; 100 tokens prefill in 0.1 s
    rates = LoadRates(disk_gbps=0.5, h2d_gbps=50, prefill_tok_s=1000)
    plan = plan_cold(chunks("cold", "cold", "cold"), rates, n_prefix=10, n_question=10, fused_tokens=fused)
    assert plan.choices == ["recompute"] * 3 and plan.front == 3 and plan.disk_bytes == 0
    assert plan.est_s == pytest.approx(0.32) and plan.recompute_all_s == pytest.approx(0.32)
    assert plan.load_all_s == pytest.approx(6 + max(3 / 50, 70 / 1000))
    assert "recomputed 3 of the 3 chunks" in cold_plan_notes({"cold_plan": plan.as_dict()})[0]
    assert cold_plan_notes({}) == []


def test_fast_disk_loads_every_chunk():
    rates = LoadRates(disk_gbps=100, h2d_gbps=100, prefill_tok_s=100)
    plan = plan_cold(chunks("cold", "cold"), rates, 10, 10, fused)
    assert plan.choices == ["load", "load"] and plan.disk_bytes == 2 * GB
    assert plan.est_s == pytest.approx(0.02 + (0.2 * 200 + 10) / 100)


def test_prefills_the_front_while_the_back_loads():
    # 1 s per chunk from disk, 1 s per chunk to prefill, copies and the fused pass free:
    # prefilling 2 chunks overlaps reading the other 2
    rates = LoadRates(disk_gbps=1, h2d_gbps=1e9, prefill_tok_s=100)
    plan = plan_cold(chunks("cold", "cold", "cold", "cold"), rates, 0, 0, 0.0)
    assert plan.choices == ["recompute", "recompute", "load", "load"] and plan.recompute == [0, 1]
    assert plan.est_s == pytest.approx(2.0) and plan.load_all_s == pytest.approx(4.0)
    assert plan.recompute_all_s == pytest.approx(4.0) and plan.disk_bytes == 2 * GB
    # pooled chunks at the back cost no disk: one chunk prefilled covers the other's read
    plan = plan_cold(chunks("cold", "cold", "warm", "hot"), rates, 0, 0, 0.0)
    assert plan.choices == ["recompute", "load", "load", "load"] and plan.est_s == pytest.approx(1.0)
    # two chunks: one prefilled while the other is read
    assert estimate_s(chunks("cold", "cold"), 1, rates, 0, 0, lambda n: 0.0) == pytest.approx(1.0)
    assert plan_cold(chunks("cold", "cold"), rates, 0, 0, 0.0).choices == ["recompute", "load"]


def test_a_running_read_counts_whole():
    rates = LoadRates(disk_gbps=1, h2d_gbps=1e9, prefill_tok_s=60)   # 100 tokens: 1.67 s; 1 GB read: 1 s
    assert estimate_s(chunks("reading"), 0, rates, 0, 0, lambda n: 0.0) == pytest.approx(1.0)
    assert plan_cold(chunks("reading"), rates, 0, 0, 0.0).choices == ["load"]
    assert plan_cold(chunks("reading"), LoadRates(0.1, 1e9, 1000), 0, 0, 0.0).choices == ["recompute"]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown chunk state"):
        plan_cold(chunks("lukewarm"), LoadRates(), 0, 0, 0.0)
    with pytest.raises(ValueError, match="rates must be > 0"):
        plan_cold(chunks("cold"), LoadRates(disk_gbps=0), 0, 0, 0.0)


def test_rates_learn_from_observations():
    rates = LoadRates(disk_gbps=2.0, alpha=0.5)
    rates.observe_disk(4 * GB, 1.0)
    assert rates.disk_gbps == pytest.approx(3.0)
    rates.observe_disk(0, 1.0)                      # nothing read: nothing learnt
    rates.observe_prefill(1000, 0.0)
    assert rates.disk_gbps == pytest.approx(3.0) and rates.prefill_tok_s == LoadRates().prefill_tok_s


def test_layer_groups_cover_every_layer_once():
    for n in (1, 2, 4, 28, 32, 80):
        groups = layer_groups(n)
        assert [a for a, _ in groups] == [0, *[b for _, b in groups[:-1]]] and groups[-1][1] == n
        assert groups[0] == (0, 1) and max(b - a for a, b in groups) <= 8
    assert layer_groups(32) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 24), (24, 32)]


# ---- end to end on the tiny model (CPU: the same code without streams) ----------------------------

def no_prefetch(tiers):
    """Nothing moves before the request runs: every chunk is cold when the plan looks."""
    tiers.prefetcher._schedule = lambda cid: None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", torch.float32, 1e-5, id="cpu"),
           pytest.param("cuda", torch.bfloat16, 1e-2, id="cuda", marks=[pytest.mark.cuda, cuda])]


@pytest.mark.parametrize("device,dtype,atol", DEVICES)
def test_every_chunk_recomputed_equals_the_full_prefill(tmp_path_factory, device, dtype, atol):
    lm, store, prefix, ids = setup(tmp_path_factory, device, dtype)
    tiers = tiers_for(lm, store, device)
    no_prefetch(tiers)
    slow_disk = LoadRates(disk_gbps=1e-6, h2d_gbps=50, prefill_tok_s=1e4)   # loading is hopeless: recompute
    try:
        q = question(lm)
        context = torch.cat([store.read(c).tokens.long() for c in ids])
        tiers.submit("r", [prefix, *ids])
        got = fuse_layerwise(lm, tiers, "r", q, selector="a3", ratio=0.15, rates=slow_disk)
        assert got.timings["cold_plan"]["choices"] == ["recompute"] * len(ids)
        # nothing pinned: not even the prefix is read, the full prefill runs from the tokens
        assert got.timings["recompute"] == len(ids) + 1 and tiers.prefetcher.disk_reads == 0
        assert got.n_recomputed == len(ids) * T and "recomputed 5 of the 5 chunks" in cold_plan_notes(got.timings)[0]
        full_cache, want = full_prefill(lm, torch.cat([store.read(prefix).tokens.long(), context, q]))
        torch.testing.assert_close(got.logits, want, atol=atol, rtol=0)
        n = got.layout.total_len
        assert greedy(lm, got.cache, got.logits, n, max_new_tokens=4) == greedy(lm, full_cache, want, n, max_new_tokens=4)
        # the next request with a fast disk loads them all
        tiers.submit("r2", [prefix, *ids])
        again = fuse_layerwise(lm, tiers, "r2", q, selector="a3", ratio=0.15, rates=LoadRates(disk_gbps=1e6))
        assert again.timings["cold_plan"]["choices"] == ["load"] * len(ids) and again.timings["cold"] == len(ids) + 1
        # the prefix pinned, the chunks not: a plain prefill of context + question over the stored prefix
        tiers.gpu.clear()
        assert all(tiers.host.evict(c) for c in ids)
        tiers.submit("r3", [prefix, *ids])
        third = fuse_layerwise(lm, tiers, "r3", q, selector="a3", ratio=0.15, rates=slow_disk)
        assert third.timings["recompute"] == len(ids) and third.timings["warm"] == 1
        tokens = torch.cat([context, q]).to(device)
        with torch.inference_mode():   # (the synthetic prefix KV is random: not a prefill of its tokens)
            out = lm.model(input_ids=tokens[None], position_ids=torch.arange(P, P + len(tokens), device=device)[None],
                           **cache_kwargs(lm.model, cache_from_kv(store.read(prefix).kv.to(device, dtype))),
                           use_cache=True)
        torch.testing.assert_close(third.logits, out.logits[0, -1].float(), atol=atol, rtol=0)
        assert all(e.refs == 0 for e in tiers.gpu._entries.values()) and all(e.refs == 0 for e in tiers.host._entries.values())
    finally:
        tiers.close()


@pytest.mark.parametrize("kv_dtype", ["model", "fp8", "int8"])
def test_chunk_states_count_the_bytes_a_load_moves(tmp_path_factory, kv_dtype):
    """The plan's byte counts are what a chunk's load copies: codes and their scales (the scales
    were left out: ~1% low for fp8 / int8 at 512-token chunks, more for short chunks)."""
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32, kv_dtype=kv_dtype)
    tiers = tiers_for(lm, store, "cpu")
    try:
        tiers.submit("r", [prefix, *ids])
        states = tiers.chunk_states("r")
        pairs, _ = tiers.acquire("r")
        for (_, n, nbytes), (gpu, _) in zip(states, pairs):
            moved = gpu.kv.nbytes + (gpu.scales.nbytes if gpu.scales is not None else 0)
            assert gpu.n_tokens == n and nbytes == moved and isinstance(nbytes, int)
        tiers.release("r", pairs)
    finally:
        tiers.close()


@pytest.mark.parametrize("kv_dtype", ["model", "fp8", "int8"])
@pytest.mark.parametrize("device,dtype,atol", DEVICES)
def test_front_prefilled_while_the_back_loads_equals_fusion_over_that_prefix(tmp_path_factory, device, dtype, atol,
                                                                              kv_dtype):
    """The plan's mixed case: [prefix, front] prefilled from the tokens, the back loaded and fused
    over it, as `fusion.fuse` with the front's fresh K/V as the prefix; from a quantised store
    too: the front's K/V stays in the model dtype beside chunks held as codes and scales (it
    was cast to the pools' fp8 / int8 code dtype without scales, off by 0.015 / truncated)."""
    from kvfuse.loader.store import ChunkData
    from kvfuse.runtime.fusion import fuse
    from kvfuse.runtime.kvcache import kv_from_cache
    lm, store, prefix, ids = setup(tmp_path_factory, device, dtype, kv_dtype=kv_dtype)
    tiers = tiers_for(lm, store, device)
    no_prefetch(tiers)
    try:
        q = question(lm)
        tiers.submit("r", [prefix, *ids])
        nbytes = tiers.chunk_states("r")[1][2]                   # a chunk's KV bytes as stored
        # a chunk takes 1 s from disk and 1 s to prefill; copies are free: prefill some, load the rest
        rates = LoadRates(disk_gbps=nbytes / 1e9, h2d_gbps=1e9, prefill_tok_s=T)
        got = fuse_layerwise(lm, tiers, "r", q, selector="epic", ratio=0.25, rates=rates)
        k = got.timings["cold_plan"]["recomputed"]
        assert 0 < k < len(ids) and got.timings["recompute"] == k + 1 and got.timings["cold"] == len(ids) - k
        assert tiers.prefetcher.disk_reads == len(ids) - k and got.timings["front_tokens"] == P + k * T
        front_tokens = torch.cat([store.read(c).tokens for c in [prefix, *ids[:k]]])
        cache, _ = full_prefill(lm, front_tokens.long())
        front = ChunkData("front", kv_from_cache(cache).cpu(), front_tokens, store.read(prefix).saliency, 0)
        want = fuse(lm, front, [store.read(c) for c in ids[k:]], q, "epic", 0.25)
        assert torch.equal(got.recomputed[k * T:], want.recomputed) and got.n_recomputed == k * T + want.n_recomputed
        assert torch.equal(got.recomputed[:k * T], torch.arange(P, P + k * T))
        torch.testing.assert_close(got.logits, want.logits, atol=atol, rtol=0)
        assert all(e.refs == 0 for e in tiers.gpu._entries.values()) and all(e.refs == 0 for e in tiers.host._entries.values())
    finally:
        tiers.close()


@pytest.mark.parametrize("device,dtype,atol", DEVICES)
def test_mixed_load_and_recompute_equals_fusion_with_those_tokens_selected(tmp_path_factory, device, dtype, atol):
    lm, store, prefix, ids = setup(tmp_path_factory, device, dtype)
    tiers = tiers_for(lm, store, device)
    no_prefetch(tiers)
    try:
        q = question(lm)
        C = len(ids) * T
        selected = torch.randperm(C, generator=torch.Generator().manual_seed(2))[: C // 5].sort().values + P
        back = torch.arange(P + 3 * T, P + C)                     # chunks 3 and 4: recomputed
        _, want, layout = plain_logits(lm, store, prefix, ids, q, torch.cat((selected, back)).unique())
        tiers.submit("r", [prefix, *ids])
        got = fuse_layerwise(lm, tiers, "r", q, selected=selected, recompute=ids[3:])
        assert got.layout == layout and got.timings["recompute"] == 2 and got.timings["cold"] == 4  # with the prefix
        assert torch.equal(got.recomputed, torch.cat((selected, back)).unique())
        torch.testing.assert_close(got.logits, want, atol=atol, rtol=0)
        assert ids[3] not in tiers.gpu and ids[3] not in tiers.host     # never read
    finally:
        tiers.close()


def test_warm_load_copies_once_per_chunk_and_layer_group(tmp_path_factory, monkeypatch):
    """Issue 11 item 4: host -> GPU copies per chunk and layer group (1, 1, 2, ... layers), not per layer,
    all queued once the first layers are; the fused KV is what the per-layer copies gave."""
    from kvfuse.runtime.layerwise import LayerwiseLoad
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)
    tiers = tiers_for(lm, store, "cpu")
    calls = []
    real = LayerwiseLoad._copy_group
    monkeypatch.setattr(LayerwiseLoad, "_copy_group", lambda self, gi, a, b: (calls.append((a, b)), real(self, gi, a, b)))
    try:
        q = question(lm)
        tiers.submit("r", [prefix, *ids])
        C = len(ids) * T
        selected = torch.arange(P, P + C, 3)
        got = fuse_layerwise(lm, tiers, "r", q, selected=selected)
        assert calls == layer_groups(lm.spec.n_layers)
        _, want, _ = plain_logits(lm, store, prefix, ids, q, selected)
        torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
    finally:
        tiers.close()


def test_a_pooled_chunk_the_plan_recomputes_is_not_held(tmp_path_factory):
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)
    tiers = tiers_for(lm, store, "cpu")
    try:
        q = question(lm)
        tiers.submit("warmup", [prefix, ids[0]])
        fuse_layerwise(lm, tiers, "warmup", q, selector="epic")          # prefix and ids[0] now hot
        no_prefetch(tiers)
        tiers.submit("r", [prefix, *ids[:3]])
        got = fuse_layerwise(lm, tiers, "r", q, selector="epic", rates=LoadRates(disk_gbps=1e-6, prefill_tok_s=1e6))
        assert got.timings["cold_plan"]["choices"] == ["recompute"] * 3    # ids[0] too: the rest must be prefilled
        assert got.timings["recompute"] == 3 and got.timings["hot"] == 1   # the prefix, loaded from its slot
        assert ids[0] in tiers.gpu and all(e.refs == 0 for e in tiers.gpu._entries.values())
        assert all(e.refs == 0 for e in tiers.host._entries.values())
    finally:
        tiers.close()


def test_learn_rates_ignores_small_disk_waits():
    from kvfuse.runtime.coldplan import ColdPlan
    from kvfuse.runtime.fusion import FusionResult
    from kvfuse.runtime.layerwise import LEARN_DISK_BYTES, learn_rates
    rates = LoadRates(disk_gbps=2.0, prefill_tok_s=1000, alpha=0.5)
    plan = ColdPlan(["load"], 1.0, 1.0, 1.0, {}, disk_bytes=LEARN_DISK_BYTES // 2)
    res = FusionResult(None, None, None, torch.arange(100), {"cold": 1, "open_s": 10.0, "recompute_s": 0.05,
                                                             "plain_prefill": True})
    learn_rates(rates, plan, res, n_question=0)
    assert rates.disk_gbps == 2.0 and rates.prefill_tok_s == pytest.approx(1500)   # 100 tokens in 50 ms
    plan.disk_bytes = 4 * 10**9
    learn_rates(rates, plan, res, n_question=0)
    assert rates.disk_gbps == pytest.approx(0.5 * 2.0 + 0.5 * 0.4)


def test_fused_passes_teach_the_plan_their_real_cost():
    """A fused pass runs slower per token than a plain prefill (probes, selection, scattered
    attention, per-layer overheads). Taking it for a prefill of its tokens, the plan chose to
    load the back of a 16k request and fuse it: 419 ms planned, 611 ms measured, slower than
    the 585 ms full prefill (H200, bench/results/kv_ttft_h200_model.json). A fused pass teaches
    fused_scale (warm requests too), and the plan then sees that the full prefill is cheaper."""
    from kvfuse.runtime.fusion import FusedLayout, FusionResult
    from kvfuse.runtime.guards import fused_tokens
    from kvfuse.runtime.layerwise import learn_rates

    n, T = 8, 512
    cold = [ChunkLoad("cold", T, 32 << 20) for _ in range(n)]
    rates = LoadRates(disk_gbps=2.0, h2d_gbps=50.0, prefill_tok_s=28000.0, alpha=1.0)
    fused = lambda c: fused_tokens(c, 32, "kvfuse", 0.15, 32)      # noqa: E731
    naive = plan_cold(cold, rates, 32, 32, fused)
    assert 0 < naive.front < n                                      # load the back, fuse it
    layout = FusedLayout(prefix_len=32, chunk_ids=tuple(range(n)), chunk_lens=(T,) * n, question_len=32)
    estimate = fused(n * T) / rates.prefill_tok_s
    warm = FusionResult(None, None, layout, torch.arange(600), {"select_s": 1.5 * estimate, "recompute_s": 1.5 * estimate})
    learn_rates(rates, None, warm, n_question=32, fused_as=("kvfuse", 0.15, 32))
    assert rates.fused_scale == pytest.approx(3.0) and rates.prefill_tok_s == 28000.0
    plan = plan_cold(cold, rates, 32, 32, fused)
    assert plan.front == n and plan.rates["fused_scale"] == pytest.approx(3.0)   # the full prefill
    assert estimate_s(cold, naive.front, rates, 32, 32, fused) > plan.est_s       # what the naive choice costs
    plain = FusionResult(None, None, layout, torch.arange(n * T), {"plain_prefill": True, "recompute_s": 0.5})
    learn_rates(rates, None, plain, n_question=32, fused_as=None)   # a plain prefill teaches the prefill rate
    assert rates.prefill_tok_s == pytest.approx((n * T + 32) / 0.5) and rates.fused_scale == pytest.approx(3.0)


def test_forced_positions_join_a_layer_plan_at_every_layer():
    """A chunk the cold plan recomputes stays recomputed at every layer of a narrowing plan."""
    from kvfuse.runtime.fusion import with_forced
    from kvfuse.runtime.selectors import LayerPlan

    plan = LayerPlan(torch.tensor([3, 5, 9, 12]), keep=[4, 4, 2, 1], pinned=torch.tensor([5]))
    out = with_forced(plan, torch.tensor([9, 20, 21]))
    assert out.initial.tolist() == [3, 5, 9, 12, 20, 21]
    assert out.keep == [6, 6, 5, 4]   # 9 was in the plan already, but may not be dropped any more
    assert sorted(out.pinned.tolist()) == [5, 9, 20, 21]


def test_a_split_must_win_clearly_or_the_full_prefill_runs():
    """A plan that reads from disk must be estimated under FULL_PREFILL_MARGIN of the full prefill:
    its estimate rests on more rates than the prefill's (H200: a 1% win by estimate ran 13% slower)."""
    from kvfuse.runtime.coldplan import FULL_PREFILL_MARGIN
    # 2 chunks of 100 tokens at 1000 tok/s (full prefill 0.2 s), 0.1 s each from disk; the fused
    # pass over the back costs `fused` tokens: prefilling one chunk while the other loads takes
    # 0.1 + fused / 1000 s
    rates = LoadRates(disk_gbps=1.0, h2d_gbps=1e9, prefill_tok_s=1000)
    close = plan_cold(chunks("cold", "cold", nbytes=GB // 10), rates, 0, 0, lambda n: 90.0)
    assert close.choices == ["recompute", "recompute"]          # 0.19 s against 0.2 s: not worth the risk
    assert close.est_s == close.recompute_all_s == pytest.approx(0.2)
    clear = plan_cold(chunks("cold", "cold", nbytes=GB // 10), rates, 0, 0, lambda n: 50.0)
    assert clear.choices == ["recompute", "load"] and clear.est_s == pytest.approx(0.15)
    assert clear.est_s < FULL_PREFILL_MARGIN * clear.recompute_all_s
