"""BM25 retrieval over the chunk texts of a release (bm25s), for any script.

    retriever = BM25Retriever(texts)
    hits = retriever.top("Who painted it?", k=4)    # [(index, score)], best first
    if not retriever.matches("what is the?"): ...   # no term of the question occurs anywhere
    retriever.missing("Who built the Eiffel Tower?")  # ["eiffel"]: terms no chunk holds

Terms (`terms`): the text is NFKC-normalised and case-folded, then cut into runs
of letters, digits and marks. Scripts written without spaces between words (Han,
Hiragana, Katakana, Thai, Lao, Khmer, Myanmar) are scored on overlapping character
bigrams, so "東京" in a question matches "東京タワー" in a document; other runs are
words, English stop words (bm25s' extended list) removed. A question of only stop words or punctuation
has no terms: `top` then returns the first k chunks with score 0 and `matches` is
False, which the engine reports instead of passing arbitrary chunks off as relevant.
"""

from __future__ import annotations

import os
import sys
import unicodedata

# bm25s runs a JAX top-k at import when JAX is installed, and JAX then takes 75% of every GPU's
# memory (seen on the H200: 105 of 140 GB, the benchmarks ran out of memory). Unless the host has
# already set JAX up, keep it on the CPU; BM25 top-k is tiny.
if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bm25s  # noqa: E402
import regex  # a transformers dependency: Unicode properties (\p{M}, \p{Han}) the re module lacks
from bm25s.stopwords import STOPWORDS_EN_PLUS

# Scripts written without spaces between words (plus the Katakana-Hiragana prolonged sound mark).
_NO_SPACE = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\u30fc"
_RUN = regex.compile(r"[\p{L}\p{N}\p{M}_]+")
_SEGMENT = regex.compile(rf"([{_NO_SPACE}][{_NO_SPACE}\p{{M}}]*)")
_STOP = frozenset(STOPWORDS_EN_PLUS)


def terms(text: str) -> list[str]:
    """The BM25 terms of `text`: words (no English stop words) and character bigrams of
    space-free scripts (a lone character stands for itself)."""
    out: list[str] = []
    for run in _RUN.findall(unicodedata.normalize("NFKC", text).casefold()):
        for k, seg in enumerate(_SEGMENT.split(run)):
            if not seg:
                continue
            if k % 2:  # a space-free script
                out.extend([seg] if len(seg) == 1 else [seg[i:i + 2] for i in range(len(seg) - 1)])
            elif seg.strip("_") and seg not in _STOP:
                out.append(seg)
    return out


# English inflection endings, longest first: what `inflection_key` strips (one of them)
_ENDINGS = ("ings", "ing", "ers", "er", "ed", "es", "en", "s", "e")


def inflection_key(term: str) -> str:
    """`term` without one English inflection ending when at least 4 letters remain, and then
    without a doubled last letter: write / writer / writing / written -> "writ", paint / painted
    / painter -> "paint". Numbers and other scripts are their own key. For noticing that a
    question's word occurs in another form, not for ranking."""
    if not term.isalpha() or not term.isascii():
        return term
    for ending in _ENDINGS:
        if term.endswith(ending) and len(term) - len(ending) >= 4:
            term = term[:-len(ending)]
            break
    return term[:-1] if len(term) >= 5 and term[-1] == term[-2] else term


def capitalised_terms(text: str) -> set[str]:
    """The terms of the words `text` capitalises, its first word left out (a question's first
    word is capitalised anyway): the names it asks about."""
    runs = _RUN.findall(unicodedata.normalize("NFKC", text))
    return {t for run in runs[1:] if run[0].isupper() for t in terms(run)}


class BM25Retriever:
    def __init__(self, texts: list[str]):
        if not texts:
            raise ValueError("nothing to retrieve from: the release has no chunks")
        self.n = len(texts)
        corpus = [terms(t) for t in texts]
        self.vocab = frozenset(t for doc in corpus for t in doc)
        self._vocab_keys = frozenset(map(inflection_key, self.vocab))   # `missing`
        self.index = bm25s.BM25()
        self.index.index([doc or [""] for doc in corpus], show_progress=False)

    def matches(self, query: str) -> bool:
        """Whether any term of `query` occurs in some text (False: retrieval can only guess)."""
        return any(t in self.vocab for t in terms(query))

    def missing(self, query: str) -> list[str]:
        """The terms of `query` that occur in no text, in question order (no repeats): a name
        the corpus never mentions means the retrieved chunks matched on the other terms only.
        Terms are not stemmed, so a lower-case word also counts as present when a text holds
        another inflection of it (`inflection_key`: "write" is there when "writer" or "written"
        is); a word the question capitalises (not its first word) must occur as it is: names
        ("Monet" is missing from a text that says "money")."""
        names = capitalised_terms(query)
        return list(dict.fromkeys(t for t in terms(query) if t not in self.vocab
                                  and (t in names or inflection_key(t) not in self._vocab_keys)))

    def top(self, query: str, k: int) -> list[tuple[int, float]]:
        """The k best texts as (index, BM25 score), best first; ties and a query without
        matching terms fall back to index order (score 0)."""
        k = max(1, min(k, self.n))
        q = [t for t in terms(query) if t in self.vocab]
        if not q:
            return [(i, 0.0) for i in range(k)]
        docs, scores = self.index.retrieve([q], k=k, show_progress=False)
        return [(int(i), float(s)) for i, s in zip(docs[0], scores[0])]
