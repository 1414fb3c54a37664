"""Attention calls at padded shapes (runtime/shape_buckets.py): the same attention as unpadded,
and the cuDNN-bound calls of requests of nearby lengths see one shape (cuDNN plans each new
shape and strides once: 45 ms to 1.2 s on the H200). On the CPU via KVFUSE_SHAPE_BUCKETS=all."""

import pytest
import torch
import torch.nn.functional as F

from kvfuse.runtime import recompute_attention as ra
from kvfuse.runtime import shape_buckets


def _problem(n_keys, rows, h_q=4, h_kv=2, d=16, seed=0, question=40):
    g = torch.Generator().manual_seed(seed)
    positions = torch.cat((torch.randperm(n_keys - question, generator=g)[:rows - question].sort().values,
                           torch.arange(n_keys - question, n_keys)))
    q = torch.randn(1, h_q, rows, d, generator=g)
    k, v = torch.randn(2, 1, h_kv, n_keys, d, generator=g)
    return positions, q, k, v


@pytest.fixture
def pad_everywhere(monkeypatch):
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "all")


def test_bucket_rounds_up_to_at_least_one_step():
    assert [shape_buckets.bucket(n, 128) for n in (0, 1, 128, 129)] == [128, 128, 128, 256]


def test_setting_is_checked(monkeypatch):
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "yes")
    with pytest.raises(ValueError, match="KVFUSE_SHAPE_BUCKETS='yes'"):
        shape_buckets.enabled(torch.zeros(1))
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "1")
    assert not shape_buckets.enabled(torch.zeros(1))          # the CPU pads only when told to


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_bucketed_sdpa_equals_sdpa(dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 37, 16, generator=g)
    k, v = torch.randn(2, 2, 2, 300, 16, generator=g)
    allowed = torch.rand(2, 1, 37, 300, generator=g) > 0.3
    allowed[..., 0] = True
    mask = allowed if dtype == torch.bool else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(dtype).min)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    got = shape_buckets.bucketed_sdpa(q, k, v, mask, 0.25)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,rows", [("sdpa", 300), ("split", 700), ("split", 1300), ("split", 200)])
def test_padded_scattered_attention_equals_unpadded(backend, rows, monkeypatch):
    positions, q, k, v = _problem(n_keys=3000, rows=rows)
    want = ra.ScatteredQueries(positions, 3000, "sdpa").attend(None, q, k, v, 0.25)
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "all")
    sq = ra.ScatteredQueries(positions, 3000, backend, host_positions=positions)
    assert sq.pad
    if backend == "split" and rows >= 700:
        assert any(p for *_, p in ra.split_groups(positions))     # the prefix calls ran
    torch.testing.assert_close(sq.attend(None, q, k, v, 0.25), want, atol=1e-5, rtol=1e-5)


def _shapes_seen(monkeypatch, n_keys, rows, backend):
    """(shape, strides) of every call that cuDNN would plan: SDPA's and the split's prefix calls."""
    seen = set()
    sdpa, with_lse = F.scaled_dot_product_attention, ra.attention_with_lse

    def record(*tensors):
        seen.update((tuple(t.shape), t.stride()) for t in tensors if isinstance(t, torch.Tensor))

    def fake_sdpa(q, k, v, attn_mask=None, **kw):
        record(q, k, v, attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def fake_lse(q, k, v, scale):
        record(q, k, v)
        return with_lse(q, k, v, scale)

    monkeypatch.setattr(ra.F, "scaled_dot_product_attention", fake_sdpa)
    monkeypatch.setattr(shape_buckets.F, "scaled_dot_product_attention", fake_sdpa)
    monkeypatch.setattr(ra, "attention_with_lse", fake_lse)
    positions, q, k, v = _problem(n_keys=n_keys, rows=rows)
    # the keys as a cache hands them over: views of a buffer with room for the question
    buf = torch.zeros(2, 1, k.shape[1], n_keys + 64, k.shape[3])
    buf[0, :, :, :n_keys], buf[1, :, :, :n_keys] = k, v
    ra.ScatteredQueries(positions, n_keys, backend, host_positions=positions).attend(
        None, q, buf[0][:, :, :n_keys], buf[1][:, :, :n_keys], 0.25)
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("backend,rows", [("sdpa", 300), ("split", 1300)])
def test_requests_of_nearby_lengths_give_cudnn_one_shape(backend, rows, monkeypatch):
    """A question one token longer, a context a few tokens shorter: the calls cuDNN plans see
    the same shapes and strides, so the plans built for the first request serve the second."""
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "0")
    first = _shapes_seen(monkeypatch, 3000, rows, backend)
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "all")
    padded = _shapes_seen(monkeypatch, 3000, rows, backend)
    for n_keys, r in ((3001, rows + 1), (2990, rows - 3)):
        monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "all")
        assert _shapes_seen(monkeypatch, n_keys, r, backend) == padded
        monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "0")
        assert _shapes_seen(monkeypatch, n_keys, r, backend) != first   # unpadded: new shapes each time


@pytest.mark.parametrize("selector", ["kvfuse", "prophet", "a3"])
def test_fused_prefill_at_padded_shapes_equals_unpadded(selector, tmp_path_factory, monkeypatch):
    """Through a model: the probes' masked calls (kvfuse_attention) and the repair passes padded,
    the same selection and logits."""
    from conftest import tiny_model_dir
    from test_fusion import make_chunks

    from kvfuse.runtime.attention import use_kvfuse_attention
    from kvfuse.runtime.fusion import fuse
    from kvfuse.runtime.model import load_model

    lm = load_model(str(tiny_model_dir(tmp_path_factory, arch="llama")))
    use_kvfuse_attention(lm.model)
    g = torch.Generator().manual_seed(3)
    prefix, chunks = make_chunks(lm, [2, 10, 11, 12], [torch.randint(5, 100, (n,), generator=g).tolist()
                                                        for n in (40, 33, 51)])
    question = torch.randint(5, 100, (7,), generator=g)
    want = fuse(lm, prefix, chunks, question, selector, 0.2)
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "all")
    got = fuse(lm, prefix, chunks, question, selector, 0.2)
    assert torch.equal(got.recomputed, want.recomputed)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)


def test_masked_attention_call_at_padded_shapes_equals_sdpa(monkeypatch):
    """kvfuse_attention's masked calls outside a scattered pass (question probes over a cache)."""
    from types import SimpleNamespace

    from kvfuse.runtime.attention import kvfuse_attention

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 9, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 200, 16, generator=g)
    mask = (torch.arange(200)[None, :] <= torch.arange(191, 200)[:, None])[None, None]   # [1, 1, 9, 200]
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=2, is_causal=True, training=False)
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "0")
    want, _ = kvfuse_attention(module, q, k, v, mask, scaling=0.25)
    calls = []
    monkeypatch.setattr(shape_buckets, "bucketed_sdpa", lambda *a, **kw: calls.append(a) or bucketed(*a, **kw))
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "all")
    got, _ = kvfuse_attention(module, q, k, v, mask, scaling=0.25)
    assert len(calls) == 1 and got.shape == want.shape == (1, 9, 4, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


bucketed = shape_buckets.bucketed_sdpa


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend,rows", [("sdpa", 840), ("split", 2490)])
def test_cuda_padded_scattered_attention_equals_unpadded(backend, rows, monkeypatch):
    """On the GPU (cuDNN for the masked call and the prefixes), bf16 at a Llama-3-8B layer's heads."""
    positions, q, k, v = _problem(n_keys=16416, rows=rows, h_q=32, h_kv=8, d=128, question=32)
    q, k, v = (t.cuda().bfloat16() for t in (q, k, v))
    positions = positions.cuda()
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "0")
    want = ra.ScatteredQueries(positions, 16416, backend, host_positions=positions.cpu()).attend(None, q, k, v, 0.088)
    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "1")
    sq = ra.ScatteredQueries(positions, 16416, backend, host_positions=positions.cpu())
    assert sq.pad
    torch.testing.assert_close(sq.attend(None, q, k, v, 0.088).float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_decode_step_plans_nothing_per_key_length(masked):
    """A decode step (one query; no mask, or the batched decoder's [B, 1, 1, K] mask) runs on a
    kernel without per-shape plans: the first call at a new key length costs about what the second
    does (cuDNN: ~65 ms unmasked, up to ~1 s masked, against ~0.1 ms)."""
    import time
    from types import SimpleNamespace

    from kvfuse.runtime.attention import kvfuse_attention

    module = SimpleNamespace(layer_idx=0, num_key_value_groups=4, is_causal=True, training=False)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    def mask(n):
        return torch.ones(1, 1, 1, n, dtype=torch.bool, device="cuda") if masked else None

    warm = torch.randn(1, 8, 4000, 128, device="cuda", dtype=torch.bfloat16)
    kvfuse_attention(module, q, warm, warm, mask(4000), scaling=0.088)   # the kernel's own first use
    firsts = []
    for n in (9001, 9002, 9003):
        k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        kvfuse_attention(module, q, k, k, mask(n), scaling=0.088)
        torch.cuda.synchronize()
        firsts.append(time.perf_counter() - t0)
    assert max(firsts) < 0.02, firsts


def test_a_nan_left_in_the_scratch_does_not_reach_a_later_call(pad_everywhere):
    """A request whose keys held a NaN must not poison later, shorter calls on the same thread
    through the padded scratch (a hidden key's weight is 0, but 0 * NaN is NaN)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 9, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 300, 16, generator=g)
    mask = torch.ones(1, 1, 9, 300, dtype=torch.bool)
    bad_k, bad_v = torch.randn(2, 1, 2, 1000, 16, generator=g)
    bad_v[:, :, 500:] = float("nan")
    shape_buckets.bucketed_sdpa(q, bad_k, bad_v, torch.ones(1, 1, 9, 1000, dtype=torch.bool), 0.25)   # same bucket
    got = shape_buckets.bucketed_sdpa(q, k, v, mask, 0.25)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25,
                                                                    enable_gqa=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1, 300), (1, 1, 9, 1), (2, 1, 9, 300)])
def test_masks_that_broadcast_are_padded_whole(shape):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k, v = torch.randn(2, 2, 2, 300, 16, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(shape_buckets.bucketed_sdpa(q, k, v, mask, 0.25), want, atol=1e-5, rtol=1e-5)


def test_no_padding_where_gradients_flow(pad_everywhere):
    positions, q, k, v = _problem(n_keys=300, rows=40)
    q.requires_grad_(True)
    out = ra.ScatteredQueries(positions, 300, "sdpa").attend(None, q, k, v, 0.25)
    out.sum().backward()                                       # the scratch would break the graph
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("selector", ["kvfuse", "a3"])
def test_layerwise_load_pads_in_place(tmp_path_factory, monkeypatch, selector):
    """The layer-wise load's fused buffer holds the padded key length (zeroed past its tokens), so the
    padded attention reads its keys in place (no scratch copy of keys or values) and the result is the
    unpadded one: same selection, same logits, same continuation."""
    from test_layerwise import question, setup, tiers_for

    from kvfuse.runtime.layerwise import fuse_layerwise

    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)
    q = question(lm)
    results, calls = {}, []
    real = shape_buckets.bucketed_sdpa
    monkeypatch.setattr(shape_buckets, "bucketed_sdpa", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for setting in ("0", "all"):
        monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", setting)
        shape_buckets._scratch.buffers.clear()
        tiers = tiers_for(lm, store, "cpu")
        try:
            tiers.submit("r", [prefix, *ids])
            results[setting] = fuse_layerwise(lm, tiers, "r", q, selector=selector, ratio=0.2)
        finally:
            tiers.close()
        if setting == "all":
            assert calls                                        # the padded attention ran ...
            assert "key" not in shape_buckets._scratch.buffers and "value" not in shape_buckets._scratch.buffers
    assert torch.equal(results["all"].recomputed, results["0"].recomputed)
    torch.testing.assert_close(results["all"].logits, results["0"].logits, atol=1e-5, rtol=1e-5)


def test_in_place_widening_only_for_registered_buffers():
    buffer = torch.randn(2, 1, 3, 64, 8)                       # [L, 2, H, T, D]-like, tail not zeroed
    view = buffer[0, :, :, :40]                                # [1, 3, 40, 8]
    assert shape_buckets._in_place(view, 64) is None           # not registered: never read past 40
    buffer[..., 40:, :] = 0
    shape_buckets.zeroed_beyond(buffer)
    wide = shape_buckets._in_place(view, 64)
    assert wide.shape == (1, 3, 64, 8) and wide.data_ptr() == view.data_ptr()
    assert torch.equal(wide[:, :, :40], view) and not wide[:, :, 40:].any()
    assert shape_buckets._in_place(view, 65) is None           # past each head's rows


def _registered(T=64, n=40):
    """A registered [L, 2, H, T, D] buffer, data before row n, zeros after; and its [..., :n] view."""
    buffer = torch.randn(2, 2, 3, T, 8)
    buffer[..., n:, :] = 0
    shape_buckets.zeroed_beyond(buffer)
    return buffer, buffer[:, :, :, :n]


def test_in_place_never_widens_into_another_heads_rows():
    """A view that does not start at row 0 of its head, a one-head view, a view of every other
    head, a length other than the buffer's rows: copied, never widened into other rows."""
    buffer, fused = _registered()
    offset = fused[0, 0, :, 10:40][None]                      # [1, 3, 30, 8], rows 10.. of each head
    one_head = fused[0, 0, 0:1][None]                         # [1, 1, 40, 8]
    every_other = fused[0, 0, ::2][None]                      # [1, 2, 40, 8], head stride 2 T D
    for view, length in ((offset, 64), (one_head, 128), (every_other, 128), (fused[0, 0][None], 48)):
        wide = shape_buckets._in_place(view, length)
        assert wide is None or not wide[:, :, view.shape[2]:].any(), (view.shape, view.stride(), length)
    assert shape_buckets._in_place(fused[0, 0][None], 48) is None   # strides would not be the bucket's


def test_in_place_never_narrows():
    """length < n is an error, as it is for the scratch copy: no silently dropped keys."""
    _, fused = _registered()
    with pytest.raises(RuntimeError):
        shape_buckets.padded("key", fused[0, 0][None], 20)


def test_widened_keys_have_the_strides_of_their_bucket(tmp_path_factory, monkeypatch):
    """The probes and repair passes run N + Q' keys (Q' = min(Q, PROBE_QUESTION_TOKENS)) of a buffer
    allocated for N + Q: two requests whose probe keys share a bucket but whose N + Q do not must
    still hand cuDNN one set of strides (a masked plan per new strides: ~1 s on the H200). Small
    buckets so that the tiny store shows it. (Found in review: the in-place view kept the buffer's
    head stride.)"""
    from test_layerwise import setup, tiers_for

    from kvfuse.runtime import guards
    from kvfuse.runtime.layerwise import fuse_layerwise

    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "all")
    monkeypatch.setattr(shape_buckets, "KEY_BUCKET", 128)
    monkeypatch.setattr(guards, "PROBE_QUESTION_TOKENS", 8)
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)   # N = 4 + 5 * 16 = 84
    sdpa = F.scaled_dot_product_attention
    seen: dict[tuple, set] = {}

    def record(q, k, v, attn_mask=None, **kw):
        seen.setdefault(tuple(k.shape), set()).add(k.stride())
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(shape_buckets.F, "scaled_dot_product_attention", record)
    monkeypatch.setattr(ra.F, "scaled_dot_product_attention", record)
    g = torch.Generator().manual_seed(0)
    for i, n_question in enumerate((10, 60)):                # N + Q = 94 (bucket 128), 144 (bucket 256)
        q = torch.randint(5, 100, (n_question,), generator=g)
        tiers = tiers_for(lm, store, "cpu")
        try:
            tiers.submit(f"r{i}", [prefix, *ids])
            fuse_layerwise(lm, tiers, f"r{i}", q, selector="kvfuse", ratio=0.2)
        finally:
            tiers.close()
    assert all(len(strides) == 1 for strides in seen.values()), seen


def test_in_place_also_under_inference_mode(tmp_path_factory, monkeypatch):
    """Under torch.inference_mode a slice of the buffer has no `_base`: the registry goes by the
    storage, so the padded attention still reads the buffer in place (no scratch copies)."""
    from test_layerwise import question, setup, tiers_for

    from kvfuse.runtime.layerwise import fuse_layerwise

    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "all")
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)
    shape_buckets._scratch.buffers.clear()
    tiers = tiers_for(lm, store, "cpu")
    try:
        tiers.submit("r", [prefix, *ids])
        with torch.inference_mode():
            fuse_layerwise(lm, tiers, "r", question(lm), selector="kvfuse", ratio=0.2)
    finally:
        tiers.close()
    assert "key" not in shape_buckets._scratch.buffers


def test_a_buffer_whose_length_is_a_whole_bucket_is_read_in_place_too(tmp_path_factory, monkeypatch):
    """N + Q exactly a multiple of the key bucket: no padding rows, but the buffer is still registered
    (its question rows zeroed until their K/V land), so the probes read it in place (review: it was
    registered only when padded rows existed)."""
    from test_layerwise import question, setup, tiers_for

    from kvfuse.runtime.layerwise import fuse_layerwise

    monkeypatch.setenv("KVFUSE_SHAPE_BUCKETS", "all")
    lm, store, prefix, ids = setup(tmp_path_factory, "cpu", torch.float32)
    q = question(lm)
    tiers = tiers_for(lm, store, "cpu")
    try:
        tiers.submit("r", [prefix, *ids])
        n = sum(store.read(c).kv.shape[3] for c in [prefix, *ids]) + len(q)
        monkeypatch.setattr(shape_buckets, "KEY_BUCKET", n)                 # N + Q is one whole bucket
        shape_buckets._scratch.buffers.clear()
        fuse_layerwise(lm, tiers, "r", q, selector="kvfuse", ratio=0.2)
    finally:
        tiers.close()
    assert "key" not in shape_buckets._scratch.buffers
