"""The whole path on the real default model (slow: ~1-2 min on 2 cores)."""

import pytest
import torch

from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.pipeline.samples import wiki_paragraphs
from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.fusion import full_prefill, fuse, greedy
from kvfuse.runtime.model import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    lm = load_model("smollm2-135m")
    docs = wiki_paragraphs(n=6, topic="Arts")
    cache = tmp_path_factory.mktemp("e2e") / "cache"
    build_cache(docs, cache, lm, BuildConfig(progress=False))
    return FusionEngine(cache, lm)


def test_ratio_one_equals_full_prefill_on_real_model(engine):
    recs = engine.store.records()[:3]
    chunks = [engine.store.read(r.chunk_id) for r in recs]
    q = engine.question_ids("What is this about?")
    res = fuse(engine.lm, engine.prefix, chunks, q, "qattn", 1.0)
    all_ids = torch.cat([engine.prefix.tokens, *[c.tokens for c in chunks], q.int()])
    cache, logits = full_prefill(engine.lm, all_ids)
    assert (res.logits - logits).abs().max() < 1e-3
    n = len(all_ids)
    assert greedy(engine.lm, res.cache, res.logits, n, 12) == greedy(engine.lm, cache, logits, n, 12)


def test_ask_reports_reuse_and_compares(engine):
    a = engine.ask("What is the painting known for?", top_k=3, ratio=0.15, max_new_tokens=8, compare=True)
    assert a.n_recomputed > 0 and a.n_reused > a.n_recomputed
    assert a.full_ttft_s > 0 and a.first_token_kl >= 0
