"""Suites, scoring and the eval harness (tiny random model; the real runs live in bench/results)."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model_dir

from kvfuse.bench import evaluate as ev
from kvfuse.cli.main import main
from kvfuse.bench.suites import needle_recall, niah_suite, squad_em_f1, squad_suite
from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.model import load_model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory, arch="qwen2", max_position_embeddings=8192)))


def test_needle_recall_and_squad_scores():
    assert needle_recall("The numbers are 1234567 and 7654321.", ("1234567", "7654321")) == 1.0
    assert needle_recall("12345678", ("1234567",)) == 0.0  # whole numbers only
    assert needle_recall("1234567", ("1234567", "2222222")) == 0.5
    assert squad_em_f1("The Denver Broncos.", ("Denver Broncos",)) == (1.0, 1.0)
    em, f1 = squad_em_f1("Broncos of Denver", ("Denver Broncos", "x"))
    assert em == 0.0 and f1 == pytest.approx(0.8)
    assert squad_em_f1("", ("a b",)) == (0.0, 0.0)


def test_niah_suite_is_seeded_and_hides_every_needle(lm):
    a, b = niah_suite(lm.tokenizer, 8, seed=1), niah_suite(lm.tokenizer, 8, seed=1)
    assert a == b
    c = niah_suite(lm.tokenizer, 8, seed=2)
    assert [e.answers for e in a.examples] != [e.answers for e in c.examples]
    docs = {d.doc_id: d.text for d in a.documents}
    assert {e.kind for e in a.examples} == {"single", "multikey", "multivalue", "multiquery"}
    for ex in a.examples:
        text = " ".join(docs[d] for d in ex.doc_ids)
        assert all(v in text for v in ex.answers)
        assert sum(len(lm.tokenizer(docs[d])["input_ids"]) for d in ex.doc_ids) >= 2000
        assert len(set(ex.doc_ids)) == len(ex.doc_ids)
    pool_use = [d for ex in a.examples for d in ex.doc_ids if d.startswith("pool/")]
    assert len(pool_use) > len(set(pool_use))  # haystack pieces shared across examples: their chunks dedupe


def _fake_squad(home):
    arts = []
    for t in range(9):
        paras = [{"context": f"Paragraph {p} of article {t} says the river is {t * 10 + p} miles long.",
                  "qas": [{"id": f"q{t}-{p}", "question": f"How long is the river in paragraph {p}?",
                           "answers": [{"text": f"{t * 10 + p} miles", "answer_start": 0}]}]} for p in range(7)]
        arts.append({"title": f"Article_{t}", "paragraphs": paras})
    (home / "data").mkdir(parents=True)
    (home / "data" / "squad-dev-v1.1.json").write_text(json.dumps({"data": arts, "version": "1.1"}))


def test_squad_suite_gold_among_same_article_distractors(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFUSE_HOME", str(tmp_path))
    _fake_squad(tmp_path)
    s = squad_suite(12, seed=0)
    docs = {d.doc_id: d.text for d in s.documents}
    for ex in s.examples:
        assert len(ex.doc_ids) == 5 and len({d.split("#")[0] for d in ex.doc_ids}) == 1
        assert sum(ex.answers[0] in docs[d] for d in ex.doc_ids) == 1
    assert len({ex.id for ex in s.examples}) == 12


def test_squad_without_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFUSE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts/setup.sh"):
        squad_suite(2, seed=0)


def test_evaluate_end_to_end_resumes_and_redoes_edited_selectors(lm, tmp_path, monkeypatch):
    cfg = ev.EvalConfig(suite="niah", model="tiny", methods=["reuse", "kvfuse", "prophet"], ratios=[0.2, 1.0], n=2,
                        seed=0, out=tmp_path / "run", build={"enrich": False}, progress=False, corpus_examples=3)
    report = ev.evaluate(cfg, lm)
    rows = {(r["method"], r["ratio"]): r for r in report["results"]}
    assert set(rows) == {(m, r) for m in cfg.methods for r in cfg.ratios}
    assert rows[("kvfuse", 1.0)]["kl"] < 1e-4 and rows[("kvfuse", 1.0)]["agreement"] == 1.0
    assert rows[("kvfuse", 1.0)]["answer_kl"] < 1e-4
    assert all(r["answer_kl"] >= 0 for r in rows.values())
    assert rows[("reuse", 0.2)]["answer_kl"] > 10 * rows[("kvfuse", 1.0)]["answer_kl"]  # the answer KL sees reuse
    (p,) = [p for p in report["paired"] if p["other"] == "prophet" and p["ratio"] == 0.2]
    assert p["answer_kl_gain_ci"][0] <= p["answer_kl_gain"] <= p["answer_kl_gain_ci"][1]
    assert "answer-KL gain" in (cfg.out / "accuracy-niah-tiny-isolated.md").read_text()
    assert rows[("reuse", 0.2)]["recomputed"] == 0
    assert rows[("kvfuse", 0.2)]["recomputed_frac"] == pytest.approx(0.2, abs=0.01)
    for suffix in ("json", "md", "png"):
        assert (cfg.out / f"accuracy-niah-tiny-isolated.{suffix}").stat().st_size > 0
    lines = (cfg.out / ev.RESULTS).read_text().splitlines()
    assert len(lines) == 2 * (1 + 3 * 2)

    ev.evaluate(cfg, lm)  # everything done: nothing recomputed
    assert (cfg.out / ev.RESULTS).read_text().splitlines() == lines
    ev.rewrite_report(cfg.out)  # from results.jsonl alone
    again = json.loads((cfg.out / "accuracy-niah-tiny-isolated.json").read_text())["results"]
    key = lambda e: (e["method"], e["ratio"], e["n"], round(e["kl"], 9))  # noqa: E731
    assert [key(e) for e in again] == [key(e) for e in report["results"]]

    real = ev.selector_rev
    monkeypatch.setattr(ev, "selector_rev", lambda m: "edited" if m == "prophet" else real(m))
    ev.evaluate(cfg, lm)  # prophet's code "changed": only its rows are redone
    redone = [json.loads(l) for l in (cfg.out / ev.RESULTS).read_text().splitlines()[len(lines):]]
    assert {r["method"] for r in redone} == {"prophet"} and len(redone) == 4

    # the store holds the documents of 3 examples whatever n is, so n = 1 reuses it as it is
    store_docs = {r.doc_id for r in FusionEngine(cfg.out / "store", lm, verify=False).records}
    assert store_docs >= set(ev.make_suite("niah", lm.tokenizer, 3, 0).examples[2].doc_ids)
    done = len((cfg.out / ev.RESULTS).read_text().splitlines())
    ev.evaluate(dataclasses.replace(cfg, n=1), lm)
    assert len((cfg.out / ev.RESULTS).read_text().splitlines()) == done
    # rows read other stored chunks (another build's KV): method rows redone, the full prefill kept
    monkeypatch.setattr(ev, "chunks_digest", lambda ids: "other-build")
    ev.evaluate(dataclasses.replace(cfg, n=1), lm)
    redone = [json.loads(l) for l in (cfg.out / ev.RESULTS).read_text().splitlines()[done:]]
    assert len(redone) == 6 and ev.REFERENCE not in {r["method"] for r in redone}
    assert {r["chunks"] for r in redone} == {"other-build"}

    # rows written by the harness before the answer KL existed are redone, the full prefill's too
    done = (cfg.out / ev.RESULTS).read_text().splitlines()
    old = [{k: v for k, v in json.loads(l).items() if k not in ("v", "answer_kl", "answer_kl_max", "answer_ids")}
           for l in done]
    (cfg.out / ev.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in old))
    ev.evaluate(dataclasses.replace(cfg, n=1), lm)
    redone = [json.loads(l) for l in (cfg.out / ev.RESULTS).read_text().splitlines()[len(old):]]
    assert len(redone) == 7 and all("answer_kl" in r and r["v"] == ev.ROW_VERSION for r in redone)


def test_a_run_folder_refuses_another_suite(lm, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ev.META).write_text(json.dumps({"suite": "squad", "model": "tiny", "seed": 0, "build": {}}))
    cfg = ev.EvalConfig(suite="niah", model="tiny", methods=["reuse"], ratios=[0.1], n=1, seed=0, out=out,
                        corpus_examples=1)
    with pytest.raises(ValueError, match="another --out"):
        ev.evaluate(cfg, lm)


def test_cli_rejects_bad_methods_and_ratios_before_loading():
    r = CliRunner().invoke(main, ["eval", "--suite", "niah", "--methods", "reuse,magic", "--out", "x"])
    assert r.exit_code != 0 and "magic" in r.output
    r = CliRunner().invoke(main, ["eval", "--suite", "niah", "--ratios", "0.1,lots", "--out", "x"])
    assert r.exit_code != 0 and "comma-separated" in r.output


def test_first_token_kl():
    lp = torch.tensor([0.7, 0.2, 0.1]).log()
    assert ev.first_token_kl(lp, lp.clone() * 1.0) == pytest.approx(0.0, abs=1e-6)
    assert ev.first_token_kl(lp, torch.tensor([0.0, 0.0, 0.0])) > 0


def test_paired_compares_kvfuse_with_each_method_on_shared_examples():
    row = lambda ex, m, r, kl, score: ((ex, m, r), {"example": ex, "method": m, "ratio": r, "kl": kl, "score": score})  # noqa: E731
    rows = dict([row("a", "kvfuse", 0.1, 0.1, 1.0), row("a", "prophet", 0.1, 0.3, 0.5),
                 row("b", "kvfuse", 0.1, 0.2, 1.0), row("b", "prophet", 0.1, 0.1, 1.0),
                 row("c", "prophet", 0.1, 9.0, 0.0),                      # kvfuse did not run c: not paired
                 row("a", ev.REFERENCE, 1.0, 0.0, 1.0)])
    (p,) = ev.paired(rows)
    assert (p["other"], p["ratio"], p["n"]) == ("prophet", 0.1, 2)
    assert p["kl_gain"] == pytest.approx(((0.3 - 0.1) + (0.1 - 0.2)) / 2)
    assert p["score_gain"] == pytest.approx(0.25)
    assert (p["kl_wins"], p["kl_losses"]) == (1, 1)
    assert ev.paired({k: v for k, v in rows.items() if k[1] != "kvfuse"}) == []


def test_evaluate_runs_the_facts_suite(lm, tmp_path):
    cfg = ev.EvalConfig(suite="facts", model="tiny", methods=["reuse", "kvfuse"], ratios=[1.0], n=2, seed=0,
                        out=tmp_path / "facts", build={"enrich": False}, progress=False, corpus_examples=2)
    report = ev.evaluate(cfg, lm)
    assert report["metric"] == "fact match" and report["full"]["n"] == 2
    rows = {r["method"]: r for r in report["results"]}
    assert rows["kvfuse"]["answer_kl"] < 1e-4 and rows["kvfuse"]["agreement"] == 1.0
    assert 0.0 <= rows["reuse"]["score"] <= 1.0


def test_evaluate_kv_dtype_pairs_each_method_with_its_quantised_store(lm, tmp_path):
    """--kv-dtype int8: the same chunks re-encoded, every method run on both stores against one
    full prefill; kv_paired reports the KL increase and retention drop per method."""
    cfg = ev.EvalConfig(suite="facts", model="tiny", methods=["reuse", "kvfuse"], ratios=[0.15], n=2, seed=0,
                        out=tmp_path / "kv", build={"enrich": False}, progress=False, corpus_examples=2,
                        kv_dtype="int8")
    report = ev.evaluate(cfg, lm)
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"reuse", "kvfuse", "reuse@int8", "kvfuse@int8"}
    lines = [json.loads(l) for l in (cfg.out / ev.RESULTS).read_text().splitlines()]
    assert len(lines) == 2 * (1 + 4)  # one full prefill per example, shared by both stores
    by = {(l["example"], l["method"]): l for l in lines}
    for ex in {l["example"] for l in lines}:
        assert by[(ex, "reuse@int8")]["chunks"] != by[(ex, "reuse")]["chunks"]   # other chunk ids: int8 KV
        assert by[(ex, "reuse@int8")]["kl"] != by[(ex, "reuse")]["kl"]
    pairs = {p["method"]: p for p in report["kv_paired"]}
    assert set(pairs) == {"reuse", "kvfuse"} and all(p["n"] == 2 and p["kv_dtype"] == "int8" for p in pairs.values())
    p = pairs["reuse"]
    assert p["kl_increase"] == pytest.approx(p["kl_quant"] - p["kl"])
    assert p["kl_increase_ci"][0] <= p["kl_increase"] <= p["kl_increase_ci"][1]
    assert abs(p["kl_increase"]) < 0.05  # int8 KV: a small change of the first-token distribution
    assert all(p["other"] in ("reuse",) or "@" not in p["other"] for p in report["paired"])
    md = (cfg.out / "accuracy-facts-tiny-isolated-int8.md").read_text()
    assert "KL increase" in md and "reuse@int8" in md
    assert ev.command_line(cfg).endswith("--kv-dtype int8 --corpus-examples 2")
    ev.rewrite_report(cfg.out)
    assert json.loads((cfg.out / "accuracy-facts-tiny-isolated-int8.json").read_text())["kv_paired"] == \
        json.loads(json.dumps(report["kv_paired"]))


def test_selector_dev_scores_whole_answers(lm, tmp_path, monkeypatch, capsys):
    """The selector dev loop's --answers: ratio 1.0 is the full prefill, so its answer KL is 0 and
    its whole greedy answer is the full prefill's; plain reuse is scored on the same answers."""
    from kvfuse.bench import selector_dev
    cfg = ev.EvalConfig(suite="facts", model="tiny", methods=["reuse"], ratios=[0.5], n=2, seed=0,
                        out=tmp_path / "facts", build={"enrich": False}, progress=False, corpus_examples=2)
    ev.evaluate(cfg, lm)
    monkeypatch.setattr(selector_dev, "load_model", lambda name: lm)
    selector_dev.main([str(tmp_path / "facts"), "kvfuse,reuse", "--ratios", "1.0", "--answers"])
    means = {line.split()[0]: [float(x) for x in line.split()[2:]] for line in capsys.readouterr().out.splitlines()
             if line.startswith("  ")}
    assert means["kvfuse"][0] < 1e-4 and means["kvfuse"][1] < 1e-4 and means["kvfuse"][2] == 1.0
    assert means["reuse"][1] >= 0.0 and 0.0 <= means["reuse"][2] <= 1.0


def test_oracle_answer_positions_spell_the_answer():
    from conftest import WORDS, make_tiny_tokenizer
    from kvfuse.bench.oracle_selection import answer_positions
    tok = make_tiny_tokenizer()
    words = sorted(set(WORDS))[:6]
    ids = torch.tensor(tok.convert_tokens_to_ids(words))
    answer = " ".join(words[2:4])
    got = answer_positions(tok, ids, answer, start=100)
    assert got == [102, 103]
    assert tok.decode([int(ids[p - 100]) for p in got]) == answer
    assert answer_positions(tok, ids, "not in the chunk", start=100) == []
