"""The `facts` suite: short documents of invented facts, several similar ones per prompt (issue 12).

    suite = facts_suite(n=100, seed=0)

A seeded pool of `FACTS_POOL` short documents, each about one invented thing (a
bridge, a mill, a vole census, a choir, a ferry, a lighthouse) with a person, a
year and a number. An example retrieves the gold document together with
`SAME_KIND` other documents of the same kind (same wording, other names and
values) and `OTHER_KIND` of other kinds, shuffled, and asks for one attribute of
the gold one. Co-retrieved and enrichment-neighbour chunks tempt the model with
the wrong entity, which is the failure issue 12 reports. Names and values are
unique in the pool, so exactly one document holds the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvfuse.pipeline.corpus import Document

from .suites import Example, Suite

FACTS_POOL = 96            # documents in the corpus (16 per kind)
SAME_KIND = 1              # distractors of the gold document's kind per example
OTHER_KIND = 2             # distractors of other kinds
FACTS_CHUNK_TOKENS = 256   # every document is one chunk
FACTS_MAX_NEW_TOKENS = 40  # qwen2.5-0.5b opens with "According to the information provided in the documents, "

_FIRST = ("Clara Tobias Ada Silas Ruth Hugo Lena Marta Felix Iris Oskar Nora Edwin Greta Anton Mabel Victor "
          "Elsa Jonas Dora Emil Hilda Rupert Vera Cyril Agnes Bruno Olive Linus Freya").split()
_SYL = ("ar bel cor dun fen gal hol ker lin mar nor pel quin ros sal tav vel wen yor zan brim cal dor "
        "esk har mor rad stan thor ul").split()
_END = "wick ley more ford by holm ridge stead worth ton well ham".split()
_PLACE_END = "ia ar on en is ow un ey".split()


@dataclass(frozen=True)
class _Kind:
    name: str
    text: str                       # {thing} {place} {person} {year} {number}
    questions: dict                 # attribute -> question template ({thing})
    number_range: tuple[int, int]


KINDS = (
    _Kind("bridge", "The {thing} Bridge crosses the {place} estuary at its narrowest point. It was built by the "
          "engineer {person} and opened to traffic in {year}. The bridge has a main span of {number} meters "
          "and carries two railway tracks above four road lanes.",
          {"person": "Who built the {thing} Bridge?", "year": "In which year did the {thing} Bridge open to traffic?",
           "number": "How long is the main span of the {thing} Bridge, in meters?"}, (120, 990)),
    _Kind("mill", "{thing} Mill is a former textile mill on the river {place}. It was founded by the merchant "
          "{person} in {year} and employed about {number} weavers at its peak. Today the building houses a "
          "museum of printed cotton.",
          {"person": "Who founded {thing} Mill?", "year": "In which year was {thing} Mill founded?",
           "number": "How many weavers did {thing} Mill employ at its peak?"}, (150, 950)),
    _Kind("vole", "The {thing} vole is a small rodent of the {place} flats. The most recent census, led by the "
          "zoologist {person} in {year}, counted {number} individuals. The vole feeds on samphire and breeds "
          "twice a year.",
          {"person": "Who led the most recent census of the {thing} vole?",
           "year": "In which year was the most recent census of the {thing} vole?",
           "number": "How many {thing} voles did the most recent census count?"}, (1200, 9800)),
    _Kind("choir", "The {thing} Choir was established in {year} by the organist {person}. It sings at the "
          "cathedral of {place} every Sunday and has {number} members who tour abroad each summer.",
          {"person": "Who established the {thing} Choir?", "year": "In which year was the {thing} Choir established?",
           "number": "How many members does the {thing} Choir have?"}, (24, 96)),
    _Kind("ferry", "The {thing} ferry links the island of {place} to the mainland. The crossing takes {number} "
          "minutes and the ferry makes nine round trips a day in summer. The ferry company was founded by "
          "{person} in {year}.",
          {"person": "Who founded the {thing} ferry company?", "year": "In which year was the {thing} ferry company founded?",
           "number": "How many minutes does the crossing of the {thing} ferry take?"}, (12, 95)),
    _Kind("lighthouse", "{thing} Lighthouse stands on a basalt stack off Cape {place}. Its light can be seen from "
          "{number} nautical miles away. The tower was designed by the architect {person} and first lit in {year}.",
          {"person": "Who designed {thing} Lighthouse?", "year": "In which year was {thing} Lighthouse first lit?",
           "number": "From how many nautical miles away can the light of {thing} Lighthouse be seen?"}, (8, 40)),
)
ATTRIBUTES = ("person", "year", "number")


def _unique(rng: random.Random, make, taken: set) -> str:
    while True:
        x = make()
        if x not in taken:
            taken.add(x)
            return x


def _pool(rng: random.Random) -> list[dict]:
    """FACTS_POOL fact records, kinds interleaved; every name, place, year and number unique."""
    taken: set = set()
    word = lambda ends: (rng.choice(_SYL) + rng.choice(ends)).capitalize()  # noqa: E731
    records = []
    for i in range(FACTS_POOL):
        kind = KINDS[i % len(KINDS)]
        surname = _unique(rng, lambda: word(_END), taken)
        lo, hi = kind.number_range
        records.append({
            "id": f"facts/{kind.name}-{i // len(KINDS)}", "kind": kind,
            "thing": _unique(rng, lambda: word(_END), taken), "place": _unique(rng, lambda: word(_PLACE_END), taken),
            "person": f"{rng.choice(_FIRST)} {surname}", "surname": surname,
            "year": _unique(rng, lambda: str(rng.randrange(1780, 2000)), taken),
            "number": _unique(rng, lambda: str(rng.randrange(lo, hi)), taken),
        })
    return records


def _text(r: dict) -> str:
    return r["kind"].text.format(**{k: r[k] for k in ("thing", "place", "person", "year", "number")})


def facts_suite(n: int, seed: int) -> Suite:
    """`n` examples over a pool of FACTS_POOL documents; prefix-stable in n (the first n are
    the same whatever n), deterministic for a seed."""
    pool = _pool(random.Random(f"facts-pool-{seed}"))
    docs = [Document(r["id"], _text(r), {"kind": r["kind"].name}) for r in pool]
    examples = []
    for i in range(n):
        rng = random.Random(f"facts-{seed}-{i}")
        gold = rng.randrange(len(pool))
        g = pool[gold]
        # no distractor may echo the gold name's first syllable ("Radham" / "Radwick", "Cape Salis" / "Salford"):
        # a 0.5B model then mixes them up in the full prefill too, and the suite would measure the model
        stem = g["thing"][:3]
        fair = [j for j, r in enumerate(pool)
                if j != gold and not any(w.startswith(stem) for k in ("thing", "place", "person") for w in r[k].split())]
        same = [j for j in fair if pool[j]["kind"] is g["kind"]]
        other = [j for j in fair if pool[j]["kind"] is not g["kind"]]
        chosen = [gold] + rng.sample(same, SAME_KIND) + rng.sample(other, OTHER_KIND)
        rng.shuffle(chosen)
        attr = ATTRIBUTES[i % len(ATTRIBUTES)]
        answers = (g["person"], g["surname"]) if attr == "person" else (g[attr],)
        question = g["kind"].questions[attr].format(thing=g["thing"])
        examples.append(Example(f"facts-{i}", tuple(pool[j]["id"] for j in chosen), question, answers,
                                f"{g['kind'].name}-{attr}", FACTS_MAX_NEW_TOKENS))
    return Suite("facts", docs, examples, FACTS_CHUNK_TOKENS, "match", False)
