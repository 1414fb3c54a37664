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
    assert a.full_token_ids and (a.first_difference is None) == (a.token_ids == a.full_token_ids)


def test_demo_question_fused_answer_names_the_painter(tmp_path):
    """`kvfuse demo`'s own cache and question (the README's first command), the default selector
    and ratio: the fused answer names Seurat as the full prefill does. The one-probe rule
    (`kvfuse-1probe`) named Auguste Rodin here, which is why it is not the default."""
    from kvfuse.cli.demo import DEMO_QUESTION, demo_corpus
    from kvfuse.pipeline.corpus import read_corpus

    lm = load_model("smollm2-135m")
    docs = read_corpus(demo_corpus(tmp_path / "corpus.jsonl"))
    build_cache(docs, tmp_path / "cache", lm, BuildConfig(progress=False))
    with FusionEngine(tmp_path / "cache", lm) as engine:
        a = engine.ask(DEMO_QUESTION, compare=True)
    assert "Seurat" in a.full_text
    assert a.fused and "Seurat" in a.text, (a.text, a.notes)
