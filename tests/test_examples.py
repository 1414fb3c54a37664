"""The examples run against a tiny cache: the host app serves its own routes and kvfuse's under
/kvfuse (over a real uvicorn server); own_decode's `model.generate` gives engine.ask's greedy answer."""

import importlib.util
from pathlib import Path

import httpx
import openai
import pytest
from conftest import tiny_model_dir
from test_engine import QUESTIONS, write_corpus
from test_serve import LiveServer

from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.runtime import FusionEngine, FusionRequest
from kvfuse.runtime.model import load_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    lm = load_model(str(tiny_model_dir(tmp_path_factory)))
    root = tmp_path_factory.mktemp("examples")
    build_cache(write_corpus(root / "c.jsonl"), root / "cache", lm,
                BuildConfig(chunk_tokens=16, enrich=False, progress=False))
    with FusionEngine(root / "cache", lm) as e:
        yield e


def test_host_app_mounts_kvfuse_next_to_its_own_routes(engine):
    host = load_example("host_app")
    live = LiveServer(host.build_app(engine))
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            assert c.get("/").json()["app"] == "host"
            found = c.get("/search", params={"q": "the capital", "k": 2}).json()["chunks"]
            assert [x["chunk_id"] for x in found] == engine.retrieve("the capital", 2)
            assert c.get("/kvfuse/healthz").json()["release"] == engine.release
            assert c.get("/v1/models").status_code == 404       # kvfuse lives under /kvfuse only
            bad = c.post("/kvfuse/v1/completions", json={"prompt": "who", "kvfuse": {"ratio": 2}})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "kvfuse.ratio"
        client = openai.OpenAI(base_url=live.url + "/kvfuse/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(model=engine.model_name, max_tokens=5,
                                             messages=[{"role": "user", "content": "the red city"}],
                                             extra_body={"kvfuse": {"top_k": 2}})
        assert out.choices[0].message.content == engine.ask("the red city", top_k=2, max_new_tokens=5).text
    finally:
        live.stop()


@pytest.mark.parametrize("selector", ["kvfuse", "reuse"])
def test_own_decode_with_generate_equals_engine_ask(engine, selector):
    own = load_example("own_decode")
    for i, question in enumerate(QUESTIONS[:3]):
        text, tokens = own.answer(engine, question, max_new_tokens=8, top_k=2 + i % 2, selector=selector)
        ref = engine.submit(FusionRequest(question=question, top_k=2 + i % 2, selector=selector,
                                          max_new_tokens=8)).result()
        assert tokens == ref.token_ids and text == ref.text
        assert len(tokens) >= 1
