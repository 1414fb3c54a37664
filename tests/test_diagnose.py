"""Issue 12's six-document corpus on the real default model (slow): the fusion mechanism is exact.

Ratio 1.0 must give the full prefill's whole greedy answer (answer KL ~ 0) and ratio 0 with one
chunk at its stored position must be prefix caching, on an isolated and on an enriched build.
What the fused answers get wrong at r = 0.15 is then selection, not mechanism (docs/eval.md).
"""

import pytest

from kvfuse.bench.diagnose_fusion import diagnose, prefix_caching_check
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.pipeline.corpus import Document
from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.model import load_model

pytestmark = pytest.mark.slow

CORPUS = {
    "orrin-bridge": "The Orrin Bridge crosses the Tavel estuary at its narrowest point. It was built by the engineer "
                    "Clara Fenwick and opened to traffic in 1962. The bridge has a main span of 410 meters and carries "
                    "two railway tracks above four road lanes.",
    "pellow-mill": "Pellow Mill is a former textile mill on the river Adder. It was founded by the merchant Tobias Grell "
                   "in 1824 and employed about six hundred weavers at its peak. Today the building houses a museum of "
                   "printed cotton.",
    "saltmarsh-vole": "The saltmarsh vole is a small rodent of the Carrow flats. The most recent census, led by the "
                      "zoologist Ada Pim, counted 8,300 individuals. The vole feeds on samphire and breeds twice a year.",
    "kettering-choir": "The Marlow Kettering Choir was established in 1898 by the organist Silas Vane. It sings at the "
                       "cathedral of Hollin every Sunday and tours abroad each summer. Its current director is Ruth Okafor.",
    "dunlin-ferry": "The Dunlin ferry links the island of Skerra to the mainland port of Arden. The crossing takes forty "
                    "minutes and the ferry makes nine round trips a day in summer. The ferry company was founded by "
                    "Hugo Stramm in 1977.",
    "amberly-lighthouse": "Amberly Lighthouse stands on a basalt stack off Cape Rool. Its light can be seen from 24 "
                          "nautical miles away. The tower was designed by the architect Lena Marsh and first lit in 1871.",
}
QUESTIONS = {"Who built the Orrin Bridge?": "Fenwick", "Who founded the Dunlin ferry company?": "Stramm"}


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m")


@pytest.mark.parametrize("enrich", [False, True])
def test_ratio_one_reproduces_the_whole_answer_and_ratio_zero_is_prefix_caching(lm, tmp_path, enrich):
    docs = [Document(k, v, {}) for k, v in CORPUS.items()]
    build_cache(docs, tmp_path / "cache", lm, BuildConfig(enrich=enrich, progress=False))
    engine = FusionEngine(tmp_path / "cache", lm)
    for question, fact in QUESTIONS.items():
        # four documents as in the issue: the retrieved ones (retrieval leaves out chunks sharing no
        # term with the question), then others as co-retrieved distractors
        ids = engine.retrieve(question, 4)
        ids += [r.chunk_id for r in engine.records if r.chunk_id not in ids][: 4 - len(ids)]
        d = diagnose(engine, question, [("kvfuse", 1.0), ("reuse", 0.0)], max_new_tokens=24, chunk_ids=ids)
        assert fact in d["full"]
        full_ratio, reuse = d["rows"]
        assert full_ratio["same"] and full_ratio["answer"] == d["full"], (question, full_ratio["answer"])
        assert max(full_ratio["kl"]) < 1e-3
        assert sum(reuse["kl"]) / len(reuse["kl"]) > 10 * max(max(full_ratio["kl"]), 1e-6)  # the KL sees the gap
        pc = prefix_caching_check(engine, question)
        if not enrich:  # stored at its own position after the prefix: exactly prefix caching
            assert pc["moved"] == 0 and pc["kl"] < 1e-5 and pc["same"], pc


ISSUE_QUESTIONS = {"Who built the Orrin Bridge?": "Fenwick", "Who founded Pellow Mill?": "Grell",
                   "How many voles did the last census count?": "8,300",
                   "Who founded the Dunlin ferry company?": "Stramm"}


@pytest.mark.parametrize("enrich", [False, True])
def test_ask_gives_the_full_prefills_answer_to_the_issue_questions(lm, tmp_path, enrich):
    """Issue 12's four questions through `kvfuse ask`'s path (retrieval, default selector and ratio,
    the engine's cost model): the answer holds the fact wherever the full prefill's does (the
    wording may differ where the engine fuses). Before retrieval left out chunks sharing no term with the question,
    three of the four named a person from a co-retrieved document."""
    docs = [Document(k, v, {}) for k, v in CORPUS.items()]
    build_cache(docs, tmp_path / "cache", lm, BuildConfig(enrich=enrich, progress=False))
    engine = FusionEngine(tmp_path / "cache", lm)
    try:
        right = 0
        for question, fact in ISSUE_QUESTIONS.items():
            a = engine.ask(question, compare=True, max_new_tokens=48)
            right += fact in a.full_text
            assert (fact in a.text) == (fact in a.full_text), (question, a.text, a.full_text, a.fused, a.notes)
        assert right >= 3   # the full prefill itself misses Pellow Mill's founder (it names the ferry's)
    finally:
        engine.close()
