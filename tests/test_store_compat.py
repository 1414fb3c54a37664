"""A format-v1 store (tests/fixtures/store_v1, written by the v1 writer with the tiny test model)
still opens and answers as it did; a refresh by this version reuses its chunks (model-dtype
chunk ids are v1's), and a refresh with another --kv-dtype builds new chunks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_dir

from fixtures.make_store_v1 import DOCS, QUESTIONS, collect_answers
from kvfuse.loader import format as fmt
from kvfuse.loader.store import Store, verify_release
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.runtime import FusionEngine
from kvfuse.runtime.model import load_model

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "store_v1_expected.json").read_text())


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    lm = load_model(str(tiny_model_dir(tmp_path_factory)))
    assert lm.spec.fingerprint == EXPECTED["fingerprint"], "the tiny test model changed: rebuild the fixture"
    return lm


@pytest.fixture()
def v1_store(tmp_path):
    path = tmp_path / "store_v1"
    shutil.copytree(FIXTURES / "store_v1", path)  # readers write leases: never into the repository
    return path


def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(DOCS)))
    return path


# The fixture's answers came from v1's selectors; v1's `kvfuse` rule is `kvfuse-joint-probes` now
# (the default's probes became incremental, which may move a token of the selection: not the store).
SAME_RULE = {"kvfuse": "kvfuse-joint-probes", "reuse": "reuse", "epic": "epic"}


def check_answers(cache, lm):
    with FusionEngine(cache, lm) as engine:
        got = collect_answers(engine, selectors=tuple(SAME_RULE.values()))
    assert len(got) == len(EXPECTED["answers"])
    for a, want in zip(got, EXPECTED["answers"]):
        assert a["selector"] == SAME_RULE[want["selector"]]
        assert {k: a[k] for k in ("question", "chunk_ids", "token_ids", "fused")} == \
            {k: want[k] for k in ("question", "chunk_ids", "token_ids", "fused")}
        torch.testing.assert_close(torch.tensor(a["logits"]), torch.tensor(want["logits"]), atol=1e-4, rtol=0)


def test_v1_store_opens_verifies_and_answers_as_before(v1_store, lm):
    with Store.open(v1_store) as store:
        assert store.manifest["format_version"] == 1 and "kv_dtype" not in store.model
        assert store.codec.name == "model" and store.stats()["kv_dtype"] == "model"
        assert store.read(store.prefix_id).kv.dtype == torch.float32
    assert verify_release(v1_store).ok
    assert any(a["fused"] for a in EXPECTED["answers"])  # the stored KV is read, not only prefilled
    check_answers(v1_store, lm)


def test_refresh_of_v1_store_reuses_its_chunks(v1_store, lm, tmp_path):
    old = {r.chunk_id for r in Store.open(v1_store, lease=False).records(include_prefix=True)}
    report = build_cache(corpus(tmp_path), v1_store, lm, BuildConfig(chunk_tokens=16, enrich=False, progress=False))
    assert report.computed == 0 and report.reused == report.chunks
    with Store.open(v1_store) as store:
        assert store.manifest["format_version"] == fmt.FORMAT_VERSION == 2
        assert store.model["kv_dtype"] == "model"
        assert {r.chunk_id for r in store.records(include_prefix=True)} == old
    check_answers(v1_store, lm)


def test_refresh_with_another_kv_dtype_builds_new_chunks(v1_store, lm, tmp_path):
    """fp8 onto a model-dtype store: new chunk ids, re-encoded from the stored KV (no prefill),
    byte-identical to a fresh fp8 build of the same corpus."""
    old = {r.chunk_id for r in Store.open(v1_store, lease=False).records(include_prefix=True)}
    config = BuildConfig(chunk_tokens=16, enrich=False, progress=False, kv_dtype="fp8")
    report = build_cache(corpus(tmp_path), v1_store, lm, config)
    fresh = tmp_path / "fresh"
    build_cache(corpus(tmp_path), fresh, lm, config)
    with Store.open(v1_store) as store, Store.open(fresh) as want:
        assert store.codec.name == "fp8" and store.model["kv_scheme"] == store.codec.scheme
        new = {r.chunk_id: r.checksum for r in store.records(include_prefix=True)}
        assert not set(new) & old and store.prefix_id not in old
        assert report.computed == 0 and report.transcoded == len(new) - 1 and report.tokens == 0
        assert new == {r.chunk_id: r.checksum for r in want.records(include_prefix=True)}
    assert verify_release(v1_store).ok
    with FusionEngine(v1_store, lm) as engine:  # answers from fp8 KV
        assert engine.ask(QUESTIONS[0], top_k=4, max_new_tokens=3, selector="reuse").token_ids


def test_engine_reloads_across_kv_dtypes_only_where_its_source_can_serve_them(v1_store, lm, tmp_path):
    """A refresh to fp8 under a running engine: the host source (CPU reads dequantise) moves to
    it; the tiered source's pools hold model-dtype KV, so it keeps serving the old release."""
    from kvfuse.runtime import EngineConfig
    configs = {kind: EngineConfig(source=kind, reload_interval_s=0, warmup=False, chunk_tokens=16)
               for kind in ("host", "tiered")}
    engines = {kind: FusionEngine(v1_store, lm, config=c) for kind, c in configs.items()}
    try:
        old = engines["host"].release
        build_cache(corpus(tmp_path), v1_store, lm,
                    BuildConfig(chunk_tokens=16, enrich=False, progress=False, kv_dtype="fp8"))
        host, tiered = engines["host"], engines["tiered"]
        assert host.release != old and host.store.codec.name == "fp8"
        assert host.ask(QUESTIONS[0], top_k=4, max_new_tokens=3, selector="reuse").token_ids
        assert tiered.release == old and tiered.counters["kv_dtype_refusals"] >= 1
        assert tiered.ask(QUESTIONS[0], top_k=4, max_new_tokens=3, selector="reuse").release == old
    finally:
        for e in engines.values():
            e.close()


def test_ask_says_a_plain_prefill_ran_where_fusion_could_not_win(v1_store, tmp_path_factory):
    """The fixture's kvfuse questions run the plain prefill (the cost model): the tokens line names
    that, not the selector and ratio asked for (a fresh user read "(kvfuse, ratio 0.15)" there)."""
    from click.testing import CliRunner
    from kvfuse.cli.main import main

    want = next(a for a in EXPECTED["answers"] if a["selector"] == "kvfuse" and not a["fused"])
    r = CliRunner().invoke(main, ["ask", str(v1_store), want["question"], "--model",
                                  str(tiny_model_dir(tmp_path_factory)), "--max-new-tokens", "2",
                                  "--selector", "kvfuse-joint-probes"])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("tokens:"))
    assert "plain prefill over the stored prefix" in line and "ratio" not in line


def test_fp8_store_of_the_legacy_scheme_still_reads(lm, tmp_path, monkeypatch):
    """An fp8 store built before the key offsets (scheme 'fp8-e4m3/k-channel/...', scale rows of
    D + T) opens with that scheme's codec, decodes what it stored and answers; a refresh with
    --kv-dtype fp8 writes the current scheme's chunks (new ids) and the old release stays readable."""
    from kvfuse.loader import quant

    legacy = next(c for c in quant.LEGACY.values() if c.name == "fp8")
    config = BuildConfig(chunk_tokens=16, enrich=False, progress=False, kv_dtype="fp8")
    cache = tmp_path / "old-fp8"
    with monkeypatch.context() as m:  # the writer of before: fp8 without key offsets
        m.setitem(quant.CODECS, "fp8", legacy)
        build_cache(corpus(tmp_path), cache, lm, config)
        with Store.open(cache) as store:
            old_release = store.release
            want = {r.chunk_id: store.read(r.chunk_id).kv for r in store.records(include_prefix=True)}
    with Store.open(cache) as store:
        assert store.codec is legacy and store.model["kv_scheme"] == legacy.scheme
        for cid, kv in want.items():
            assert torch.equal(store.read(cid).kv, kv)
    assert verify_release(cache).ok
    with FusionEngine(cache, lm) as engine:
        assert engine.ask(QUESTIONS[0], top_k=4, max_new_tokens=3, selector="reuse").token_ids
    build_cache(corpus(tmp_path), cache, lm, config)
    with Store.open(cache) as store:
        assert store.codec is quant.kv_codec("fp8") and store.codec.key_offsets
        assert not {r.chunk_id for r in store.records(include_prefix=True)} & set(want)
    with Store.open(cache, release=old_release) as store:
        assert store.codec is legacy
