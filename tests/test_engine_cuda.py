"""The engine on CUDA: the tiered source (pinned pool -> GPU pool, layer-wise copies) gives the
host source's answers, for every selector, one request at a time and batched."""

import pytest
import torch
from conftest import tiny_model_dir
from test_engine import QUESTIONS, write_corpus

from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.runtime import EngineConfig, FusionEngine, FusionRequest
from kvfuse.runtime.model import load_model
from kvfuse.runtime.selectors import SELECTORS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-cuda")
    lm = load_model(str(tiny_model_dir(tmp_path_factory)), device="cuda", dtype="float32")
    build_cache(write_corpus(root / "c.jsonl"), root / "cache", lm,
                BuildConfig(chunk_tokens=16, enrich=False, progress=False))
    gb = 1 << 30
    # no cold-load plan: every chunk is read, so the selections are the host source's (the plan,
    # taught by earlier requests, may prefill a cold request instead: tests/test_coldplan.py)
    tiered = FusionEngine(root / "cache", lm, config=EngineConfig(source="tiered", host_pool_bytes=gb, gpu_pool_bytes=gb,
                                                                  cold_plan=False))
    host = FusionEngine(root / "cache", lm, config=EngineConfig(source="host"))
    yield tiered, host
    tiered.close()
    host.close()


@pytest.mark.parametrize("selector", [s for s in SELECTORS if s != "full"])
def test_tiered_source_answers_like_host_source(engines, selector):
    tiered, host = engines
    for q in QUESTIONS[:3]:
        a = tiered.ask(q, top_k=3, selector=selector, max_new_tokens=6)
        b = host.ask(q, top_k=3, selector=selector, max_new_tokens=6)
        assert a.token_ids == b.token_ids and a.n_recomputed == b.n_recomputed


def test_tiered_batched_requests_equal_one_at_a_time(engines):
    tiered, _ = engines
    alone = [tiered.ask(q, top_k=2, max_new_tokens=8).token_ids for q in QUESTIONS]
    handles = [tiered.submit(FusionRequest(question=q, top_k=2, max_new_tokens=8)) for q in QUESTIONS]
    assert [h.result(timeout=120).token_ids for h in handles] == alone
    assert tiered.stats()["source"]["requests"] >= 2 * len(QUESTIONS)


def test_cuda_warm_up_also_runs_the_warm_path(engines, monkeypatch):
    """On CUDA the warm-up runs WARMUP_RUNS times: the first is a cold request (empty pools), the
    second finds its chunks pooled and runs the warm fused path, whose first run in a process cost
    ~1 s on the H200 (docs/loader.md, warm-up)."""
    from kvfuse.runtime import engine as engine_module

    tiered, _ = engines
    results = []
    real = FusionEngine.fused_prefill
    monkeypatch.setattr(FusionEngine, "fused_prefill", lambda self, req: results.append(real(self, req)) or results[-1])
    gb = 1 << 30
    with FusionEngine(tiered.cache_dir, tiered.lm, config=EngineConfig(source="tiered", host_pool_bytes=gb,
                                                                            gpu_pool_bytes=gb)):
        pass
    assert len(results) == engine_module.WARMUP_RUNS == 2
    last = results[-1].timings
    assert last.get("cold", 0) == 0 and last.get("hot", 0) + last.get("warm", 0) > 0, last
