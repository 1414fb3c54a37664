"""FusionEngine: the API a host server embeds.

    engine = FusionEngine("cache/", load_model("smollm2-135m"))
    answer = engine.ask("Who painted La Grande Jatte?", top_k=4, selector="kvfuse", ratio=0.15)
    print(answer.text, answer.n_reused, answer.n_recomputed, answer.ttft_s)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvfuse.loader.store import Store
from kvfuse.loader.format import dtype_name

from .attention import use_kvfuse_attention
from .fusion import full_prefill, fuse, greedy
from .guards import plan_request
from .model import LoadedModel
from .prompt import PromptTemplate
from .retrieval import BM25Retriever


@dataclass
class Answer:
    text: str
    chunk_ids: list[str]
    n_reused: int
    n_recomputed: int
    n_question: int
    ttft_s: float                      # read + assemble + select + recompute, to the first token's logits
    full_text: str | None = None       # with compare: the full prefill's answer
    full_ttft_s: float | None = None
    first_token_kl: float | None = None
    retrieval_scores: list[float] | None = None    # BM25 score of each chunk (None: chunks given by the caller)
    notes: list[str] = field(default_factory=list)  # what the guards changed: chunks dropped, plain prefill, no match


class FusionEngine:
    def __init__(self, cache_dir, lm: LoadedModel, release: str | None = None, verify: bool = True):
        self.store = Store.open(cache_dir, release)
        self.store.check_model(lm.spec.fingerprint, dtype_name(lm.spec.dtype))
        self.lm = lm
        self.verify = verify
        use_kvfuse_attention(lm.model)
        self.prompt = PromptTemplate.from_manifest(self.store.manifest["prompt"])
        self.prefix = self.store.read(self.store.prefix_id, verify=verify)
        self.records = self.store.records()
        self.retriever = BM25Retriever([r.text for r in self.records])

    def retrieve(self, question: str, top_k: int) -> list[str]:
        return [self.records[i].chunk_id for i, _ in self.retriever.top(question, top_k)]

    def question_ids(self, question: str) -> torch.Tensor:
        return self.prompt.question_ids(self.lm.tokenizer, question)

    def ask(self, question: str, top_k: int = 4, selector: str = "kvfuse", ratio: float = 0.15,
            max_new_tokens: int = 48, chunk_ids: list[str] | None = None, compare: bool = False,
            on_overflow: str = "error") -> Answer:
        if not question.strip():
            raise ValueError("empty question")
        hits = [] if chunk_ids else self.retriever.top(question, top_k)  # [(record index, BM25 score)]
        chunk_ids = chunk_ids or [self.records[i].chunk_id for i, _ in hits]
        q_ids = self.question_ids(question)
        plan = plan_request(self.lm, len(self.prefix.tokens), [self.store.record(c).n_tokens for c in chunk_ids],
                            len(q_ids), max_new_tokens, selector, ratio, on_overflow)  # before any work
        chunk_ids, selector, notes = [chunk_ids[i] for i in plan.kept], plan.selector, plan.notes
        if hits and not self.retriever.matches(question):
            notes.append("retrieval: no term of the question occurs in any chunk, so these chunks are arbitrary")
        t0 = time.perf_counter()
        chunks = [self.store.read(cid, verify=self.verify) for cid in chunk_ids]
        result = fuse(self.lm, self.prefix, chunks, q_ids, selector, ratio)
        ttft = time.perf_counter() - t0
        tokens = greedy(self.lm, result.cache, result.logits, result.layout.total_len, max_new_tokens)
        answer = Answer(self._decode(tokens), chunk_ids, result.n_reused, result.n_recomputed, len(q_ids), ttft,
                        notes=notes, retrieval_scores=[hits[i][1] for i in plan.kept] if hits else None)
        if compare:
            all_ids = torch.cat([self.prefix.tokens, *[c.tokens for c in chunks], q_ids.int()])
            t0 = time.perf_counter()
            cache, logits = full_prefill(self.lm, all_ids)
            answer.full_ttft_s = time.perf_counter() - t0
            answer.full_text = self._decode(greedy(self.lm, cache, logits, len(all_ids), max_new_tokens))
            answer.first_token_kl = float(torch.nn.functional.kl_div(
                result.logits.log_softmax(-1), logits.log_softmax(-1), log_target=True, reduction="sum"))
        return answer

    def _decode(self, tokens: list[int]) -> str:
        return self.lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
