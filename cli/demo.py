"""`kvfuse demo`: the embedded default end to end — a real Wikipedia sample, the
default model, a cache, and a question answered from it next to a full prefill."""

from __future__ import annotations

from pathlib import Path

from kvfuse.pipeline.samples import wiki_paragraphs, write_jsonl

DEMO_TOPIC = "Arts"
DEMO_DOCS = 120
DEMO_QUESTION = "Who painted A Sunday Afternoon on the Island of La Grande Jatte?"
DEMO_MUST_HAVE = "A Sunday Afternoon on the Island of La Grande Jatte"


def demo_corpus(path: Path) -> Path:
    """Write the demo corpus (jsonl) and return its path."""
    docs = wiki_paragraphs(topic=DEMO_TOPIC)
    chosen = [d for d in docs if d.doc_id == DEMO_MUST_HAVE] + [d for d in docs if d.doc_id != DEMO_MUST_HAVE]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(chosen[:DEMO_DOCS], path)
    return path
