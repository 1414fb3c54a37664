"""kvfuse.serve over a real uvicorn server on loopback (random free port, background thread),
talked to with httpx and the openai client: chat and completions, streaming and not, the kvfuse
extension object, answers equal to engine.submit, 4xx errors naming the field, metrics, api key."""

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from test_engine import cache, engine, lm, reference_tokens, write_corpus  # noqa: F401 (shared fixtures)

from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.runtime import EngineConfig, FusionEngine, FusionRequest
from kvfuse.serve import ServeConfig, create_app

KEY = "test-key"


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)




@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(create_app(engine, config=ServeConfig(max_body_bytes=16 << 10, default_max_tokens=8)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chunk_ids(engine, n=2):
    return [r.chunk_id for r in engine.records[:n]]


def sse_events(response) -> list:
    """The data payloads of an SSE response, [DONE] included."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def test_chat_completion_equals_engine_submit(engine, http):
    ids = chunk_ids(engine)
    body = {"messages": [{"role": "user", "content": "what is the capital"}], "max_tokens": 6,
            "temperature": 0, "kvfuse": {"chunk_ids": ids, "selector": "kvfuse", "ratio": 0.2}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ref = engine.submit(FusionRequest(question="what is the capital", chunk_ids=ids, ratio=0.2,
                                      max_new_tokens=6)).result()
    single = reference_tokens(engine, engine.lm, "what is the capital", ids, 6, ratio=0.2)   # fuse + greedy
    assert ref.token_ids == [t for t in single if t != engine.lm.tokenizer.eos_token_id]
    assert out["object"] == "chat.completion" and out["model"] == engine.model_name
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert out["choices"][0]["finish_reason"] == ref.finish_reason
    assert out["usage"]["completion_tokens"] == len(ref.token_ids)
    assert out["usage"]["prompt_tokens"] == ref.n_reused + ref.n_recomputed + ref.n_question
    kv = out["kvfuse"]
    assert kv["chunk_ids"] == ids and kv["release"] == engine.release and kv["n_recomputed"] == ref.n_recomputed
    assert kv["doc_ids"] == ref.doc_ids and kv["ttft_s"] > 0


def test_completion_retrieves_and_equals_engine(engine, http):
    r = http.post("/v1/completions", json={"prompt": "who is the river", "max_tokens": 5,
                                           "kvfuse": {"top_k": 3}})
    assert r.status_code == 200, r.text
    out = r.json()
    ref = engine.ask("who is the river", top_k=3, max_new_tokens=5)
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == ref.text and out["kvfuse"]["chunk_ids"] == ref.chunk_ids


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the red city"}]}),
    ("/v1/completions", {"prompt": "the red city"}),
])
def test_streaming_sends_the_same_text_as_sse(engine, http, path, body):
    body = {**body, "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True},
            "kvfuse": {"top_k": 2}}
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    chat = "chat" in path
    text = "".join((c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
                   for c in chunks)
    ref = engine.ask("the red city", top_k=2, max_new_tokens=10)
    assert text == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    assert chunks[-1]["kvfuse"]["chunk_ids"] == ref.chunk_ids
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(ref.token_ids)
    if chat:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_openai_client_chat_completion_and_stream(engine, client):
    ids = chunk_ids(engine, 3)
    ref = engine.submit(FusionRequest(question="what country is paris", chunk_ids=ids, max_new_tokens=7)).result()
    kw = dict(model=engine.model_name, messages=[{"role": "user", "content": "what country is paris"}],
              max_completion_tokens=7, temperature=0, extra_body={"kvfuse": {"chunk_ids": ids}})
    out = client.chat.completions.create(**kw)
    assert out.choices[0].message.content == ref.text
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.model_extra["kvfuse"]["chunk_ids"] == ids
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == ref.text
    comp = client.completions.create(model=engine.model_name, prompt="what country is paris", max_tokens=7,
                                     extra_body={"kvfuse": {"chunk_ids": ids}})
    assert comp.choices[0].text == ref.text
    assert [m.id for m in client.models.list().data] == [engine.model_name]


def test_concurrent_http_requests_equal_sequential(engine, http):
    questions = ["what is the capital", "who is the river", "the red city", "london is the capital"]
    sequential = [engine.ask(q, top_k=2, max_new_tokens=6).text for q in questions]
    out = [None] * len(questions)

    def worker(i):
        r = http.post("/v1/completions", json={"prompt": questions[i], "max_tokens": 6, "kvfuse": {"top_k": 2}})
        out[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(questions))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert out == sequential


GOOD = {"messages": [{"role": "user", "content": "who"}], "max_tokens": 3}


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]"),
    ({**GOOD, "kvfuse": {"chunk_ids": ["nope"]}}, 400, "kvfuse.chunk_ids"),
    ({**GOOD, "kvfuse": {"chunk_ids": "abc"}}, 400, "kvfuse.chunk_ids"),
    ({**GOOD, "kvfuse": {"selector": "magic"}}, 400, "kvfuse.selector"),
    ({**GOOD, "kvfuse": {"selector": ["a"]}}, 400, "kvfuse.selector"),
    ({**GOOD, "kvfuse": {"ratio": 1.5}}, 400, "kvfuse.ratio"),
    ({**GOOD, "kvfuse": {"ratio": -0.1}}, 400, "kvfuse.ratio"),
    ({**GOOD, "kvfuse": {"ratio": "half"}}, 400, "kvfuse.ratio"),
    ({**GOOD, "kvfuse": {"top_k": 0}}, 400, "kvfuse.top_k"),
    ({**GOOD, "kvfuse": {"ration": 0.1}}, 400, "kvfuse.ration"),
    ({**GOOD, "max_tokens": 1000, "kvfuse": {"top_k": 8}}, 400, "kvfuse.top_k"),   # 1024-position model
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    ({**GOOD, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({**GOOD, "temperature": -1}, 400, "temperature"),
    ({**GOOD, "top_p": 0}, 400, "top_p"),
    ({**GOOD, "n": 2}, 400, "n"),
    ({**GOOD, "stream": "sometimes"}, 400, "stream"),
    ({**GOOD, "stop": 5}, 400, "stop"),
    ({**GOOD, "model": "gpt-4o"}, 404, "model"),
    ({**GOOD, "pad": "x" * (20 << 10)}, 413, None),
])
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_stays_up(http, body, status, param):
    if isinstance(body, bytes):
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post("/v1/chat/completions", json=body)
    engine_decides = param in ("kvfuse.chunk_ids", "kvfuse.top_k")    # RequestError.status: 400, 404 or 413
    assert r.status_code == status or engine_decides and r.status_code in (404, 413), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if param:
        assert param in err["message"]
    elif status == 400:
        assert "JSON" in err["message"]
    good = http.post("/v1/chat/completions", json=GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_completion_prompt_names_prompt(http):
    for body in ({"prompt": ""}, {}, {"prompt": ["a", "b"]}, {"prompt": 5}):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (body, r.text)


def test_oversized_body_streamed_without_length_gets_413(http):
    def parts():
        yield b'{"messages": [{"role": "user", "content": "who"}], "pad": "'
        for _ in range(40):
            yield b"x" * 1024
        yield b'"}'
    r = http.post("/v1/chat/completions", content=parts(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of sample `name` (whose labels contain `labels`) in Prometheus text; 0 if absent."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and labels in sample:
            return float(value)
    return 0.0


def test_metrics_move_and_healthz(engine, http):
    before = http.get("/metrics").text
    r = http.post("/v1/completions", json={"prompt": "the river is red", "max_tokens": 4, "kvfuse": {"top_k": 2}})
    assert r.status_code == 200
    after = http.get("/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name in ("kvfuse_tokens_reused_total", "kvfuse_tokens_recomputed_total", "kvfuse_tokens_generated_total",
                 "kvfuse_ttft_seconds_count", "kvfuse_request_duration_seconds_count"):
        assert metric(text, name) > metric(before, name), name
    assert metric(text, "kvfuse_pool_hits_total", 'tier="cold"') > 0
    assert metric(text, "kvfuse_bytes_loaded_total", 'tier="disk"') > 0
    assert 0 < metric(text, "kvfuse_pool_hit_rate", 'tier="cold"') <= 1
    assert metric(text, "kvfuse_queue_depth") >= 0
    assert f'kvfuse_release_info{{model="{engine.model_name}",release="{engine.release}"}} 1.0' in text
    assert metric(text, "kvfuse_http_requests_total", 'status="200"') >= 1
    health = http.get("/healthz").json()
    assert health == {"status": "ok", "model": engine.model_name, "release": engine.release}


def test_api_key(engine):
    live = LiveServer(create_app(engine, api_key=KEY))
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            body = {"prompt": "who", "max_tokens": 2}
            missing = c.post("/v1/completions", json=body)
            wrong = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
            for r in (missing, wrong, c.get("/v1/models")):
                assert r.status_code == 401 and r.json()["error"]["param"] == "authorization"
            assert c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
            assert c.get("/healthz").status_code == 200
        good = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=engine.model_name, prompt="who", max_tokens=2).choices
        bad = openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=engine.model_name, prompt="who", max_tokens=2)
    finally:
        live.stop()


def test_client_disconnect_cancels_a_streaming_request(engine, http):
    before = engine.stats().get("requests_cancelled", 0)
    body = {"prompt": "what is the city of the country", "max_tokens": 900, "stream": True,
            "kvfuse": {"top_k": 1}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break                   # leave after the first chunk
    deadline = time.monotonic() + 30
    while engine.stats().get("requests_cancelled", 0) == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.05)
    assert http.post("/v1/completions", json={"prompt": "who", "max_tokens": 2}).status_code == 200


def test_hot_reload_is_visible_through_the_server(tmp_path, lm):
    corpus = write_corpus(tmp_path / "c.jsonl")
    cfg = BuildConfig(chunk_tokens=16, enrich=False, progress=False)
    first = build_cache(corpus, tmp_path / "cache", lm, cfg).release
    engine = FusionEngine(tmp_path / "cache", lm, config=EngineConfig(reload_interval_s=0))
    live = LiveServer(create_app(engine))
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            assert c.get("/healthz").json()["release"] == first
            with open(corpus, "a") as f:
                f.write(json.dumps({"id": "fresh", "text": "tokyo is the capital of japan"}) + "\n")
            second = build_cache(corpus, tmp_path / "cache", lm, cfg).release
            out = c.post("/v1/completions", json={"prompt": "tokyo japan", "max_tokens": 2,
                                                  "kvfuse": {"top_k": 1}}).json()
            assert out["kvfuse"]["release"] == second != first and out["kvfuse"]["doc_ids"] == ["fresh"]
            assert f'release="{second}"' in c.get("/metrics").text
    finally:
        live.stop()
        engine.close()


def test_kvfuse_serve_cli_finishes_in_flight_requests_on_sigterm(cache, lm, tmp_path):
    """`kvfuse serve` as a process: loopback, api key; SIGTERM (as SIGINT: the same path) lets an open
    stream finish, then the process closes the engine and exits 0."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model_dir = lm.model.config._name_or_path or lm.spec.name
    env = {**os.environ, "PYTHONSAFEPATH": "1", "KVFUSE_API_KEY": KEY}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kvfuse.cli", "serve", str(cache), "--model", str(model_dir),
                             "--port", str(port), "--log-level", "warning"], env=env, stdout=log, stderr=log,
                            cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                assert httpx.get(url + "/healthz", timeout=2).status_code == 200
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        headers = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(url + "/v1/completions", json={"prompt": "who"}).status_code == 401
        body = {"prompt": "what is the city of the country", "max_tokens": 60, "stream": True, "kvfuse": {"top_k": 1}}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)                # in flight: the stream must still finish
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest and rest[-1] == "[DONE]", (first, rest[-3:])
        assert len(rest) > 10                               # it was mid-answer when the signal came
        last = json.loads(rest[-2])
        assert last["choices"][0]["finish_reason"] in ("stop", "length") and "kvfuse" in last
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
