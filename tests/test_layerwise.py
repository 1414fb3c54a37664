"""Layer-wise loading: the fused cache it builds gives the plain path's logits, on every tier.

CPU tests run the same code without streams; the cuda-marked ones run it with the side
stream and events on a GPU (skipped here)."""

import pytest
import torch

from conftest import tiny_model_dir
from kvfuse.bench.synthetic import write_synthetic_store
from kvfuse.loader.pool import PoolCapacityError
from kvfuse.loader.store import Store
from kvfuse.runtime.attention import use_kvfuse_attention
from kvfuse.runtime.driver import HostSource
from kvfuse.runtime.fusion import assemble, fuse, greedy, probe_depth, recompute
from kvfuse.runtime.layerwise import fuse_layerwise
from kvfuse.runtime.layerwise import tiers_for as model_tiers
from kvfuse.runtime.recompute_attention import plan_query_groups
from kvfuse.runtime.model import load_model
from kvfuse.runtime.selectors import SELECTORS

T, P = 16, 4


def setup(tmp_path_factory, device, dtype, n_chunks=5, kv_dtype="model"):
    # 4 layers, so that a3's probe (layers 0..1) stops early
    lm = load_model(str(tiny_model_dir(tmp_path_factory, num_hidden_layers=4)), dtype=dtype, device=device)
    use_kvfuse_attention(lm.model)
    root = tmp_path_factory.mktemp("lw-store")
    prefix, ids = write_synthetic_store(root, lm.spec, n_chunks=n_chunks, chunk_tokens=T, prefix_tokens=P,
                                        vocab=len(lm.tokenizer), shard_bytes=1 << 14, kv_dtype=kv_dtype)
    return lm, Store.open(root), prefix, ids


def tiers_for(lm, store, device, gpu_slots=8, host_slots=8, policy="lookahead"):
    slot = lm.spec.kv_bytes_per_token() * T
    return model_tiers(store, lm.spec, host_bytes=host_slots * slot, gpu_bytes=gpu_slots * slot, device=device,
                       chunk_tokens=T, policy=policy, workers=2)


def plain_logits(lm, store, prefix, ids, question, selected):
    chunks = [store.read(c) for c in ids]
    layout, kv = assemble(lm, store.read(prefix), chunks, len(question))
    tokens = torch.cat([c.tokens.long() for c in chunks])
    cache, logits = recompute(lm, kv, layout, tokens, question, selected)
    return cache, logits, layout


def question(lm):
    return torch.tensor(lm.tokenizer("what is the secret number ?", add_special_tokens=False)["input_ids"])


def check_same_as_plain(lm, store, prefix, ids, tiers, atol):
    q = question(lm)
    gen = torch.Generator().manual_seed(0)
    C = len(ids) * T
    selected = torch.randperm(C, generator=gen)[: C // 4].sort().values + P
    want_cache, want, layout = plain_logits(lm, store, prefix, ids, q, selected)
    results = []
    for run in range(3):  # cold, then hot (the GPU pool kept them), then warm (GPU pool cleared)
        if run == 2:
            tiers.gpu.clear()
        tiers.submit(f"r{run}", [prefix, *ids])
        res = fuse_layerwise(lm, tiers, f"r{run}", q, selected=selected, measure_stall=True)
        assert res.layout == layout
        torch.testing.assert_close(res.logits, want, atol=atol, rtol=0)
        results.append(res)
    n = len(ids) + 1
    # run 0 found nothing pinned: the prefetch read every chunk (some may have landed before it ran)
    assert results[0].timings["cold"] + results[0].timings["warm"] == n and tiers.prefetcher.disk_reads == n
    assert results[1].timings["hot"] == n
    assert results[2].timings["warm"] == n
    # the cache continues decoding exactly like the plain path's
    ours = greedy(lm, results[1].cache, results[1].logits, layout.total_len, max_new_tokens=5)
    assert ours == greedy(lm, want_cache, want, layout.total_len, max_new_tokens=5)
    assert len(tiers.queue) == 0
    return results


def test_layerwise_matches_plain_path_on_every_tier(tmp_path_factory):
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)
    tiers = tiers_for(lm, store, "cpu")
    try:
        check_same_as_plain(lm, store, prefix, ids, tiers, atol=1e-5)
        assert tiers.gpu.stats.hits > 0 and tiers.host.stats.hits > 0
        assert all(e.refs == 0 for e in tiers.gpu._entries.values())
    finally:
        tiers.close()


@pytest.mark.parametrize("kv_dtype", ["fp8", "int8"])
def test_quantised_store_layerwise_matches_plain_path(tmp_path_factory, kv_dtype):
    """The pools hold the codes and scales as stored; the gather dequantises them before the
    re-rotation: the same logits as the plain path over Store.read's CPU-dequantised KV."""
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32, kv_dtype=kv_dtype)
    assert store.codec.name == kv_dtype
    tiers = tiers_for(lm, store, "cpu")
    try:
        assert tiers.host.arena.dtype == tiers.gpu.arena.dtype == store.codec.code_dtype
        assert tiers.gpu.scale_arena is not None and tiers.dtype == torch.float32
        results = check_same_as_plain(lm, store, prefix, ids, tiers, atol=1e-5)
        # warm run: codes + scales moved, 1 byte per element (not float32's 4)
        L, H, D = lm.spec.n_layers, lm.spec.n_kv_heads, lm.spec.head_dim
        n_tokens = P + len(ids) * T
        scales = sum(L * H * store.codec.row_width(D, t) * 2 for t in [P] + [T] * len(ids))  # bfloat16
        assert results[2].timings["h2d_bytes"] == n_tokens * L * 2 * H * D + scales
        # the host source counts what it read as stored too (not the dequantised float32)
        host = HostSource()
        host.submit("r", store, [prefix, *ids])
        host.fuse(lm, "r", torch.tensor([5, 6, 7]), "a3", 0.2)
        assert host.stats.bytes_loaded["disk"] == n_tokens * L * 2 * H * D + scales
    finally:
        tiers.close()


def test_gather_kernel_switch_without_triton_keeps_the_torch_gather(tmp_path_factory, monkeypatch):
    """KVFUSE_GATHER_KERNEL=1 where Triton is missing (the CPU CI): no kernel plan, the same results."""
    from kvfuse.runtime import gather_kernel, layerwise
    monkeypatch.setattr(layerwise, "GATHER_KERNEL", True)
    monkeypatch.setattr(gather_kernel, "triton", None)
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32, kv_dtype="fp8")
    tiers = tiers_for(lm, store, "cpu")
    try:
        plans = []
        real = layerwise.LayerwiseLoad._kernel_plan
        monkeypatch.setattr(layerwise.LayerwiseLoad, "_kernel_plan",
                            lambda self, *a: plans.append(real(self, *a)) or plans[-1])
        check_same_as_plain(lm, store, prefix, ids, tiers, atol=1e-5)
        assert plans and all(p is None for p in plans)
    finally:
        tiers.close()


def test_gather_runs_split_at_gaps_and_dtypes():
    """A layer is gathered with one concatenation per run of adjacent chunks of one storage dtype."""
    from kvfuse.loader.pool import PoolEntry
    from kvfuse.runtime.layerwise import gather_runs

    def entry(name, n, dtype):
        kv = None if dtype is None else torch.zeros(1, 2, 1, n, 2, dtype=dtype)
        return PoolEntry(name, 0, n, 0, kv), None

    f8, bf = torch.float8_e4m3fn, torch.bfloat16
    pairs = [entry("p", 4, bf), entry("a", 8, f8), entry("b", 8, f8), entry("gap", 8, None), entry("c", 8, f8)]
    runs = gather_runs(pairs, [0, 4, 12, 20, 28])
    assert [(s, e, [g.chunk_id for g in run]) for s, e, run in runs] == \
        [(0, 4, ["p"]), (4, 20, ["a", "b"]), (28, 36, ["c"])]


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_every_chunk_recomputed_over_a_loaded_prefix(tmp_path_factory, kv_dtype):
    """Only the prefix is gathered (every chunk recomputed instead of loaded): its codes are
    dequantised like any chunk's, so the pass equals the plain path recomputing every context token."""
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32, kv_dtype=kv_dtype)
    tiers = tiers_for(lm, store, "cpu")
    try:
        q = question(lm)
        _, want, _ = plain_logits(lm, store, prefix, ids, q, torch.arange(P, P + len(ids) * T))
        tiers.submit("r", [prefix, *ids])
        got = fuse_layerwise(lm, tiers, "r", q, selector="a3", ratio=0.2, recompute=ids)
        assert got.timings.get("plain_prefill") and got.timings["recompute"] == len(ids)
        torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=1e-4)
    finally:
        tiers.close()


@pytest.mark.parametrize("selector", ["a3", "epic", "cacheblend", "prophet", "kvfuse"])
def test_selection_matches_plain_fuse(tmp_path_factory, selector):
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)
    tiers = tiers_for(lm, store, "cpu")
    try:
        q = question(lm)
        want = fuse(lm, store.read(prefix), [store.read(c) for c in ids], q, selector, 0.2)
        tiers.submit("r", [prefix, *ids])
        got = fuse_layerwise(lm, tiers, "r", q, selector=selector, ratio=0.2)
        assert torch.equal(got.recomputed, want.recomputed)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    finally:
        tiers.close()


@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_attention_matches_plain_path(tmp_path_factory, groups):
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)
    tiers = tiers_for(lm, store, "cpu")
    try:
        q = question(lm)
        C = len(ids) * T
        selected = torch.randperm(C, generator=torch.Generator().manual_seed(1))[: C // 3].sort().values + P
        _, want, _ = plain_logits(lm, store, prefix, ids, q, selected)
        tiers.submit("r", [prefix, *ids])
        got = fuse_layerwise(lm, tiers, "r", q, selected=selected, groups=groups)
        torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
        assert lm.model.config._attn_implementation == "kvfuse"  # grouped is a backend of the kvfuse attention
    finally:
        tiers.close()


def test_plan_query_groups():
    positions = torch.tensor([10, 20, 200, 300, 310, 400, 401])
    assert plan_query_groups(positions, 402, 3) == [(0, 2, 64), (2, 5, 320), (5, 7, 402)]
    assert plan_query_groups(positions, 402, 1) == [(0, 7, 402)]


def test_probe_depth():
    assert probe_depth("a3", 32) == 2 and probe_depth("a3", 1) == 1
    assert probe_depth("prophet", 32) == 32
    with pytest.raises(ValueError, match="unknown selector"):
        probe_depth("nope", 32)


def test_request_larger_than_gpu_pool_errors_cleanly(tmp_path_factory):
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)
    tiers = tiers_for(lm, store, "cpu", gpu_slots=3)
    try:
        tiers.submit("big", [prefix, *ids])
        with pytest.raises(PoolCapacityError, match="GPU pool"):
            fuse_layerwise(lm, tiers, "big", question(lm), selector="a3")
        tiers.cancel("big")
        tiers.submit("small", [prefix, *ids[:2]])
        res = fuse_layerwise(lm, tiers, "small", question(lm), selector="a3")
        assert res.layout.context_len == 2 * T
    finally:
        tiers.close()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_layerwise_matches_plain_path(tmp_path_factory):
    lm, store, prefix, ids = setup(tmp_path_factory, "cuda", torch.bfloat16, n_chunks=6)
    tiers = tiers_for(lm, store, "cuda")
    try:
        results = check_same_as_plain(lm, store, prefix, ids, tiers, atol=1e-3)
        assert all(r.timings["stall_ms"] >= 0 and r.timings["h2d_bytes"] >= 0 for r in results)
        assert tiers.host.arena.is_pinned()
        # grouped attention: the same function, other kernels (bf16 rounding differs)
        tiers.submit("g", [prefix, *ids])
        grouped = fuse_layerwise(lm, tiers, "g", question(lm), selected=results[0].recomputed, groups=3)
        torch.testing.assert_close(grouped.logits, results[0].logits, atol=2e-2, rtol=0)
    finally:
        tiers.close()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kv_dtype", ["fp8", "int8"])
def test_cuda_quantised_store_layerwise_matches_plain_path(tmp_path_factory, kv_dtype):
    """fp8/int8 codes in the pinned and GPU pools, dequantised inside the GPU gather: the
    logits of the plain path over the CPU-dequantised KV (bf16 rounding of the same values)."""
    lm, store, prefix, ids = setup(tmp_path_factory, "cuda", torch.bfloat16, n_chunks=6, kv_dtype=kv_dtype)
    tiers = tiers_for(lm, store, "cuda")
    try:
        assert tiers.gpu.arena.dtype == store.codec.code_dtype and tiers.host.scale_arena.is_pinned()
        check_same_as_plain(lm, store, prefix, ids, tiers, atol=1e-3)
    finally:
        tiers.close()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("selector", ["a3", "epic", "cacheblend", "prophet", "kvfuse"])
def test_cuda_selection_matches_plain_fuse(tmp_path_factory, selector):
    lm, store, prefix, ids = setup(tmp_path_factory, "cuda", torch.bfloat16, n_chunks=6)
    tiers = tiers_for(lm, store, "cuda")
    try:
        q = question(lm)
        want = fuse(lm, store.read(prefix), [store.read(c) for c in ids], q, selector, 0.15)
        tiers.submit("r", [prefix, *ids])
        got = fuse_layerwise(lm, tiers, "r", q, selector=selector, ratio=0.15)
        assert torch.equal(got.recomputed, want.recomputed)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-3, rtol=0)
    finally:
        tiers.close()


@pytest.mark.cuda
@cuda
def test_cuda_each_layer_is_waited_for_once(tmp_path_factory, monkeypatch):
    """The staged selector's passes (a probe, repairs, the recompute) run on one compute stream:
    once it waited for layer l's copy, later passes add no event waits (host time per layer)."""
    from kvfuse.runtime import layerwise
    lm, store, prefix, ids = setup(tmp_path_factory, "cuda", torch.bfloat16, n_chunks=6)
    tiers = tiers_for(lm, store, "cuda")
    marks = []
    close = layerwise.LayerwiseLoad.close
    monkeypatch.setattr(layerwise.LayerwiseLoad, "close", lambda self: (marks.append(len(self.stall_marks)), close(self))[1])
    try:
        q = question(lm)
        want = fuse(lm, store.read(prefix), [store.read(c) for c in ids], q, "kvfuse", 0.15)
        tiers.submit("r", [prefix, *ids])
        got = fuse_layerwise(lm, tiers, "r", q, selector="kvfuse", ratio=0.15, measure_stall=True)
        assert got.timings["repair_s"] > 0 and len(marks) == 1 and marks[0] <= lm.spec.n_layers   # 3-4 passes
        assert torch.equal(got.recomputed, want.recomputed)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-3, rtol=0)
    finally:
        tiers.close()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("selector", sorted(SELECTORS))
def test_cuda_fast_attention_equals_dense_path(tmp_path_factory, selector, monkeypatch):
    """The CUDA default (FlexAttention, block mask, GQA without repeat_kv) against the dense-mask
    SDPA path: same selections, logits within bf16 tolerance."""
    from kvfuse.runtime import recompute_attention
    lm, store, prefix, ids = setup(tmp_path_factory, "cuda", torch.bfloat16, n_chunks=6)
    q = question(lm)
    chunks = [store.read(c) for c in ids]
    fast = fuse(lm, store.read(prefix), chunks, q, selector, 0.15)
    monkeypatch.setenv("KVFUSE_RECOMPUTE_ATTENTION", "dense")
    plain = fuse(lm, store.read(prefix), chunks, q, selector, 0.15)
    assert recompute_attention._flex_failed is None, recompute_attention._flex_failed
    assert torch.equal(fast.recomputed, plain.recomputed)
    torch.testing.assert_close(fast.logits, plain.logits, atol=2e-2, rtol=0)


def test_gather_kernel_setting_from_the_environment():
    """KVFUSE_GATHER_KERNEL: 1/on force the kernel, 0/off keep the torch gather, auto (or unset) uses it
    on CUDA; anything else warns (it does not silently mean something the user did not ask for)."""
    from kvfuse.runtime.layerwise import _gather_kernel_setting
    assert _gather_kernel_setting("1") is True and _gather_kernel_setting("On") is True
    assert _gather_kernel_setting("0") is False and _gather_kernel_setting("off") is False
    assert _gather_kernel_setting("auto") is None
    with pytest.warns(UserWarning, match="KVFUSE_GATHER_KERNEL='bogus'"):
        assert _gather_kernel_setting("bogus") is None
