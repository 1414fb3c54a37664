"""Issue 13 items 6 and 7: context overflow is never silent; fusion never runs when a plain
prefill is cheaper, and a long question can't make the selectors' probes unbounded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model_dir
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.pipeline.corpus import Document
from kvfuse.runtime import guards as G
from kvfuse.runtime.driver import HostSource
from kvfuse.runtime.engine import FusionEngine, RequestError
from kvfuse.runtime.fusion import prepare
from kvfuse.runtime.guards import ContextOverflowError, check_fits, probe_view, should_fuse
from kvfuse.runtime.model import load_model

WORDS = "the red cat is in the house and the blue dog is on the tree . "


def _lm(max_positions: int):
    return SimpleNamespace(spec=SimpleNamespace(max_positions=max_positions, name="m"))


def test_check_fits_passes_raises_or_drops():
    assert check_fits(_lm(100), 10, [20, 20], 10, 10) == [0, 1]
    with pytest.raises(ContextOverflowError, match=r"needs 110 positions.*has 100.*top-k to 2"):
        check_fits(_lm(100), 10, [20, 20, 20], 10, 30)
    assert check_fits(_lm(100), 10, [20, 20, 20], 10, 30, policy="drop") == [0, 1]
    with pytest.raises(ContextOverflowError, match="shorten the question"):
        check_fits(_lm(100), 10, [20], 90, 10, policy="drop")
    with pytest.raises(ValueError, match="policy"):
        check_fits(_lm(100), 10, [20], 10, 10, policy="truncate")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A tiny model with 256 positions and a cache of 8 chunks of ~30 tokens."""
    lm = load_model(str(tiny_model_dir(tmp_path_factory, "llama", max_position_embeddings=256)))
    docs = [Document(f"d{i}", WORDS * 2) for i in range(8)]
    docs = [Document(d.doc_id, f"{i} {d.text}") for i, d in enumerate(docs)]  # distinct texts
    out = tmp_path_factory.mktemp("cache")
    build_cache(docs, out, lm, BuildConfig(chunk_tokens=40, enrich=False, progress=False))
    return lm, out


def test_overflow_is_an_error_before_any_work(small_cache, monkeypatch):
    lm, cache = small_cache
    engine = FusionEngine(cache, lm)
    monkeypatch.setattr(HostSource, "fuse", lambda *a, **k: pytest.fail("fused an overflowing prompt"))
    with pytest.raises(RequestError, match="max_position_embeddings") as e:   # the engine's 4xx-style error
        engine.ask("where is the cat ?", top_k=8, max_new_tokens=4)
    assert e.value.field == "top_k"


def test_overflow_drop_policy_reports_what_it_dropped(small_cache):
    lm, cache = small_cache
    engine = FusionEngine(cache, lm)
    ranked = engine.retrieve("where is the cat ?", 8)
    a = engine.ask("where is the cat ?", top_k=8, max_new_tokens=4, on_overflow="drop")
    assert 0 < len(a.chunk_ids) < 8 and a.chunk_ids == ranked[:len(a.chunk_ids)]  # the most relevant kept
    assert any("dropped" in n for n in a.notes)
    assert a.n_reused + a.n_recomputed + a.n_question + 4 <= lm.spec.max_positions


def test_cost_model_matches_the_reported_case():
    # issue 13: a 1,027-token question over 79 context tokens ran 0.12x with kvfuse, 0.92x with reuse
    assert not should_fuse(79, 1027, "kvfuse", 0.15)
    assert not should_fuse(79, 1027, "reuse", 0.0)
    assert not should_fuse(4000, 30, "full", 1.0)
    for sel in ("kvfuse", "prophet", "a3", "epic", "cacheblend", "reuse", "qattn"):
        assert should_fuse(4000, 30, sel, 0.15), sel
    # the probes are bounded: a long question costs the fused path no more than Q itself on top
    long_q = G.fused_tokens(4000, 2000, "kvfuse", 0.15) - 2000
    assert long_q == pytest.approx(G.fused_tokens(4000, G.PROBE_QUESTION_TOKENS, "kvfuse", 0.15) - G.PROBE_QUESTION_TOKENS)
    # an incremental selector's probes run each pick once: only the question's tokens come on top
    assert G.fused_tokens(4000, 30, "kvfuse-inc", 0.15) == pytest.approx(600 + 3 * 30 + 30)
    assert G.fused_tokens(4000, 30, "kvfuse-joint-probes", 0.15) == pytest.approx(600 * (0 + 1 + 2) / 3 + 3 * 30 + 600 + 30)
    assert G.fused_tokens(4000, 30, "kvfuse", 0.15) == pytest.approx(600 * 2 / 3 + 3 * 30 + 600 + 30)


def test_long_question_falls_back_to_a_full_prefill(small_cache):
    lm, cache = small_cache
    engine = FusionEngine(cache, lm)
    question = "where is the cat ? " * 30                       # ~150 tokens over ~35 context tokens
    a = engine.ask(question, top_k=1, max_new_tokens=2)
    assert any("full prefill" in n for n in a.notes)
    assert a.n_recomputed == sum(engine.store.record(c).n_tokens for c in a.chunk_ids)
    short = engine.ask("where is the cat ?", top_k=4, max_new_tokens=2)
    assert short.notes == [] and short.n_recomputed < sum(engine.store.record(c).n_tokens for c in short.chunk_ids)


def test_probe_runs_at_most_the_last_question_tokens(small_cache):
    lm, cache = small_cache
    engine = FusionEngine(cache, lm)
    chunks = [engine.store.read(c) for c in engine.retrieve("cat", 2)]
    q = engine.question_ids("where is the cat ? " * 40)
    assert len(q) > G.PROBE_QUESTION_TOKENS
    prep = prepare(lm, engine.prefix, chunks, q)
    attn = prep.ctx.question_attention()                          # [L, Q', C]
    assert attn.shape[1] == G.PROBE_QUESTION_TOKENS and attn.shape[2] == prep.layout.context_len
    layout, tail = probe_view(prep.layout, q)
    assert torch.equal(tail, q[-G.PROBE_QUESTION_TOKENS:]) and layout.question_start == prep.layout.question_start


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _CUDA])])
@pytest.mark.parametrize("selector", ["a3", "kvfuse"])
def test_layerwise_probe_is_bounded_like_the_plain_path(tmp_path_factory, selector, device):
    """A question longer than PROBE_QUESTION_TOKENS selects the same tokens on both paths."""
    from test_layerwise import setup, tiers_for
    from kvfuse.runtime.fusion import fuse
    from kvfuse.runtime.layerwise import fuse_layerwise

    dtype, atol = (torch.float32, 1e-5) if device == "cpu" else (torch.bfloat16, 1e-3)
    lm, store, prefix, ids = setup(tmp_path_factory, device, dtype)
    q = torch.tensor(lm.tokenizer("what is the secret number ? " * 40, add_special_tokens=False)["input_ids"])
    assert len(q) > G.PROBE_QUESTION_TOKENS
    tiers = tiers_for(lm, store, device)
    try:
        want = fuse(lm, store.read(prefix), [store.read(c) for c in ids], q, selector, 0.2)
        tiers.submit("r", [prefix, *ids])
        got = fuse_layerwise(lm, tiers, "r", q, selector=selector, ratio=0.2)
        assert torch.equal(got.recomputed.cpu(), want.recomputed.cpu())
        torch.testing.assert_close(got.logits, want.logits, atol=atol, rtol=0)
    finally:
        tiers.close()
