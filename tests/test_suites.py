"""The facts and cross-chunk (xchunk) suite generators: seeded, and answerable only as designed."""

import re

import pytest
from conftest import tiny_model_dir

from kvfuse.bench.facts_suite import KINDS, OTHER_KIND, SAME_KIND, facts_suite
from kvfuse.bench.suites import fact_match, make_suite, needle_recall
from kvfuse.bench import xchunk_suite as xs
from kvfuse.bench.xchunk_suite import xchunk_suite
from kvfuse.runtime.model import load_model


TEMPLATE_WORDS = {w.strip(".,") for k in KINDS for w in k.text.split()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory, arch="qwen2", max_position_embeddings=8192))).tokenizer


def test_facts_is_deterministic_for_a_seed_and_prefix_stable():
    a, b = facts_suite(30, seed=3), facts_suite(30, seed=3)
    assert a == b
    assert facts_suite(10, seed=3).examples == a.examples[:10]
    assert [e.answers for e in facts_suite(30, seed=4).examples] != [e.answers for e in a.examples]


def test_facts_exactly_one_document_holds_the_answer_among_similar_ones():
    s = facts_suite(60, seed=0)
    docs = {d.doc_id: d for d in s.documents}
    assert {e.kind.split("-")[1] for e in s.examples} == {"person", "year", "number"}
    for ex in s.examples:
        assert len(ex.doc_ids) == len(set(ex.doc_ids)) == 1 + SAME_KIND + OTHER_KIND
        holders = [d for d in ex.doc_ids if fact_match(docs[d].text, ex.answers)]
        assert len(holders) == 1, (ex, holders)
        kinds = [docs[d].meta["kind"] for d in ex.doc_ids]
        assert kinds.count(docs[holders[0]].meta["kind"]) == 1 + SAME_KIND  # the gold one and its kind's distractors
        gold = docs[holders[0]].text.removeprefix("The ").split()[0]
        names = lambda text: [w.strip(".,") for w in text.split() if w[:1].isupper() and w.strip(".,") not in TEMPLATE_WORDS]  # noqa: E731
        for d in ex.doc_ids:  # no distractor name starts like the gold one ("Radham" / "Radwick")
            assert d == holders[0] or not any(w.startswith(gold[:3]) for w in names(docs[d].text)), (gold, d)


def test_scores_find_names_and_numbers_with_commas():
    assert fact_match("It was built by the engineer Clara Fenwick.", ("Clara Fenwick", "Fenwick")) == 1.0
    assert fact_match("Ada Pim led it.", ("Clara Fenwick", "Fenwick")) == 0.0
    assert fact_match("The census counted 8,300 individuals.", ("8300",)) == 1.0
    assert fact_match("Fenwicks", ("Fenwick",)) == 0.0  # whole words only
    assert needle_recall("They are QXJAB and MBKTR.", ("QXJAB", "MBKTR")) == 1.0
    assert needle_recall("QXJABC", ("QXJAB",)) == 0.0


def test_xchunk_is_deterministic_for_a_seed(tokenizer):
    a, b = xchunk_suite(tokenizer, 6, seed=1), xchunk_suite(tokenizer, 6, seed=1)
    assert a == b and make_suite("xchunk", tokenizer, 6, 1) == a
    assert xchunk_suite(tokenizer, 3, seed=1).examples == a.examples[:3]
    assert [e.answers for e in xchunk_suite(tokenizer, 6, seed=2).examples] != [e.answers for e in a.examples]


def test_xchunk_answer_needs_two_chunks(tokenizer):
    s = xchunk_suite(tokenizer, 8, seed=0)
    docs = {d.doc_id: d.text for d in s.documents}
    assert {e.kind for e in s.examples} == {"vartrack", "twohop"}
    for ex in s.examples:
        texts = [docs[d] for d in ex.doc_ids]
        assert len(set(ex.doc_ids)) == len(ex.doc_ids) >= 5
        if ex.kind == "twohop":
            asked = re.search(r"code for (\S+)\?", ex.question).group(1)
            (value,) = ex.answers
            # no single chunk names the key asked about and holds its code ...
            assert not any(asked in t and value in t for t in texts)
            # ... but two do: the link "asked -> middle" and "middle -> value"
            (link,) = [t for t in texts if f"The code for {asked} is the code for" in t]
            middle = re.search(rf"The code for {asked} is the code for (\S+)\.", link).group(1)
            assert any(f"The code for {middle} is {value}." in t for t in texts)
        else:
            value = re.search(r"value (\d+)", ex.question).group(1)
            first, second = ex.answers
            assert any(f"VAR {first} = {value}." in t for t in texts)
            assert any(f"VAR {second} = {first}." in t for t in texts)
            assert not any(second in t and value in t for t in texts)  # the second name needs both chunks
        # two hops, each in its own piece (and a decoy chain of the same shape when switched on)
        assert sum(t.count("VAR ") + t.count("The code for ") for t in texts) == {"chain": 4, "hop": 3, "none": 2}[xs.XCHUNK_DECOY]
        assert sum(("VAR " in t) or ("The code for " in t) for t in texts) == {"chain": 4, "hop": 3, "none": 2}[xs.XCHUNK_DECOY]


@pytest.mark.parametrize("decoy,hops", [("chain", 4), ("hop", 3), ("none", 2)])
def test_xchunk_decoy_modes(tokenizer, monkeypatch, decoy, hops):
    monkeypatch.setattr(xs, "XCHUNK_DECOY", decoy)
    for ex, texts in _xchunk_texts(tokenizer):
        assert sum(t.count("VAR ") + t.count("The code for ") for t in texts) == hops
        values = [v for t in texts for v in re.findall(r"(?:VAR \w+ = |The code for \S+ is )(\d+)\.", t)]
        assert len(values) == (1 if decoy == "none" else 2)   # a decoy always brings its own value


def _xchunk_texts(tokenizer):
    s = xchunk_suite(tokenizer, 4, seed=0)
    docs = {d.doc_id: d.text for d in s.documents}
    return [(ex, [docs[d] for d in ex.doc_ids]) for ex in s.examples]
