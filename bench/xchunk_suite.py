"""The `xchunk` suite: RULER-style tasks whose answer needs two chunks at once (issue 12).

    suite = xchunk_suite(tokenizer, n=100, seed=0)

Two kinds, alternating, each hidden in a haystack of Paul Graham essay pieces
(the `niah` pool, so haystack chunks dedupe across examples), one hop per essay
piece, the pieces in shuffled order:

* `vartrack` (RULER variable tracking): `VAR ABCDE = 52819.` in one piece,
  `VAR FGHIJ = ABCDE.` in another, and a distractor chain with another value;
  "Which variables are assigned the value 52819?" -> both names. The second
  name is found only by reading both pieces.
* `twohop` (key chain): "The code for amber-falcon is the code for quiet-otter."
  in one piece, "The code for quiet-otter is 7719." in another, plus a
  distractor chain; "What is the code for amber-falcon?" -> 7719. No single
  piece holds both the key asked about and the answer.

Chunk-wise KV computes each piece without the other, so only recomputation (or
enrichment that happens to pair the two) can join the hops.

Sized for the accuracy model (issue 12 asks full-prefill accuracy >= 0.8 and plain
reuse below 70%): qwen2.5-0.5b cannot give both. Full prefill
(`python -m kvfuse.bench.full_accuracy --suite xchunk`, seed 0): with the whole
decoy chain 0.62 over 30 examples (vartrack 0.70, twohop 0.53), a shorter
haystack (~650 tokens of 120-token pieces) no better; with only the decoy's
valued hop 0.57 over 7 (it answers the decoy's code); without a decoy 0.925
over 20, but then plain reuse answered all of the first 5 too (one value in the
context: no chain to follow), so the suite no longer measures cross-chunk
reasoning. The default keeps the decoy chain; the model is the limit.
"""

from __future__ import annotations

import random
import string

from kvfuse.pipeline.corpus import Document

from .suites import Example, Suite, _ADJ, _NOUN, _insert, essay_suite

XCHUNK_CONTEXT_TOKENS = 900    # haystack per example (4 hop sentences among ~6 essay pieces)
XCHUNK_CHUNK_TOKENS = 256      # store chunk size; essay pieces hold at most this - 40 tokens
XCHUNK_DECOY = "chain"         # "chain": a second chain of the same shape with another value; "hop": only
                               # its hop that holds the value (another key's code, another variable's value);
                               # "none". Sizing below.
XCHUNK_KINDS = ("vartrack", "twohop")


def _var(rng: random.Random, taken: set) -> str:
    while True:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in taken:
            taken.add(v)
            return v


def _hops(kind: str, rng: random.Random) -> tuple[list[str], list[str], str, tuple[str, ...], str, str]:
    """(answer chain sentences, distractor chain sentences, question, answers, answer prefix, asked term)."""
    v, w = (str(x) for x in rng.sample(range(10_000, 100_000) if kind == "vartrack" else range(1000, 10_000), 2))
    if kind == "vartrack":
        taken: set = set()
        x1, x2, y1, y2 = (_var(rng, taken) for _ in range(4))
        chain = [f"VAR {x1} = {v}.", f"VAR {x2} = {x1}."]
        decoy = [f"VAR {y1} = {w}.", f"VAR {y2} = {y1}."]
        question = f"Which variables are assigned the value {v}, directly or through another variable?"
        prefix = (f"Answer: According to the chain of variables assigned in the text above, 2 variables are "
                  f"assigned the value {v}, they are:")  # RULER's answer prefix
        return chain, decoy, question, (x1, x2), prefix, v
    k1, k2, k3, k4 = rng.sample([f"{a}-{b}" for a in _ADJ for b in _NOUN], 4)
    chain = [f"The code for {k1} is the code for {k2}.", f"The code for {k2} is {v}."]
    decoy = [f"The code for {k3} is the code for {k4}.", f"The code for {k4} is {w}."]
    return chain, decoy, f"What is the code for {k1}?", (v,), f"The number that is the code for {k1} is", k1


def _example(i: int, pool, rng: random.Random) -> tuple[Example, list[Document]]:
    kind = XCHUNK_KINDS[i % len(XCHUNK_KINDS)]
    chain, decoy, question, answers, prefix, _ = _hops(kind, rng)
    hay, total = [], 0
    for j in rng.sample(range(len(pool)), len(pool)):
        if total >= XCHUNK_CONTEXT_TOKENS:
            break
        hay.append(j)
        total += pool[j][2]
    valued = [d for d in decoy if any(ch.isdigit() for ch in d)]   # the decoy hop that holds its value
    sentences = chain + {"chain": decoy, "hop": valued, "none": []}[XCHUNK_DECOY]
    hosts = rng.sample(range(len(hay)), len(sentences))  # one hop per piece, pieces already shuffled
    doc_ids, docs = [], []
    for h, j in enumerate(hay):
        if h in hosts:
            doc_id = f"xchunk-{i}/{pool[j][0]}"
            docs.append(Document(doc_id, _insert(pool[j][1], sentences[hosts.index(h)], rng), {}))
            doc_ids.append(doc_id)
        else:
            doc_ids.append(pool[j][0])
    max_new = 4 + 8 * len(answers)
    return Example(f"xchunk-{i}", tuple(doc_ids), question, answers, kind, max_new, prefix), docs


def xchunk_suite(tokenizer, n: int, seed: int) -> Suite:
    """`n` examples (vartrack and twohop alternating), deterministic for a seed and prefix-stable in n."""
    return essay_suite("xchunk", _example, tokenizer, n, seed, XCHUNK_CHUNK_TOKENS)
