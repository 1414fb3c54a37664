"""FusionEngine: the API a host server embeds (DESIGN §4, §5).

    engine = FusionEngine("cache/", load_model("smollm2-135m"))
    answer = engine.ask("Who painted A Sunday Afternoon on the Island of La Grande Jatte?",
                        top_k=4, selector="kvfuse", ratio=0.15)
    handle = engine.submit(FusionRequest(question="...", stream=...))   # -> RequestHandle
    for text in handle.stream(): print(text, end="")
    cache, logits, layout = engine.prefill("...")                       # a host decodes itself
    engine.close()                                                       # in-flight requests finish

One scheduler thread owns the model. Submitting a request validates it, retrieves its
chunks (BM25 over the release's chunk texts unless `chunk_ids` are given) and hands them
to the KV source at once, so their prefetch starts while earlier requests run (the queue
is what look-ahead eviction looks at). The scheduler then alternates: one fused prefill of
the next queued request, one batched decode step of every running request
(`decode.DecodeBatch`). The KV source is the tiered loader on CUDA (store -> pinned pool
-> GPU pool, layer-wise copies) and plain memory-mapped reads on the CPU (`driver.py`).

Hot release reload: when the cache's CURRENT names a new release (a nightly refresh
published), requests submitted from then on read it; in-flight ones finish on the release
they started with; pools drop chunks no live release references.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvfuse.loader.fs import current_of, is_url
from kvfuse.loader.format import dtype_name

log = logging.getLogger(__name__)
from kvfuse.loader.store import Store, read_current

from .attention import use_kvfuse_attention
from .coldplan import cold_plan_notes
from .decode import DecodeBatch, DecodeRow, sample
from .driver import make_source
from .fusion import FusionResult, _eos_ids, full_prefill, greedy
from .guards import ContextOverflowError, plan_request
from .layout import FusedLayout
from .model import LoadedModel
from .prompt import PromptTemplate
from .requests import Answer, FusionRequest, RequestError, RequestHandle
from .retrieval import BM25Retriever
from .selectors import SELECTORS

__all__ = ["Answer", "EngineConfig", "FusionEngine", "FusionRequest", "RequestError", "RequestHandle"]


WARMUP_CHUNKS = 4             # the warm-up request's chunks on CUDA: `ask`'s default top-k
WARMUP_QUESTION_TOKENS = 24   # and its question's tokens (a typical length: the passes' rows pad to multiples of 128)
WARMUP_RUNS = 2               # on CUDA: the first finds an empty pool (a cold request), the second the warm path


@dataclass
class EngineConfig:
    """How the engine runs. Pool sizes only matter on CUDA (the tiered loader)."""

    verify: bool = True                  # check chunk checksums on read (CPU path)
    max_batch: int = 16                  # running requests decoded together
    max_new_tokens_limit: int = 2048     # a request may not ask for more
    reload_interval_s: float = 0.5       # how often submit() looks at CURRENT (0: every submit)
    source: str = "auto"                 # KV source: "auto" (tiered on CUDA, host on CPU), "host", "tiered"
    host_pool_bytes: int | None = None   # pinned host pool (CUDA), default 8 GiB
    gpu_pool_bytes: int | None = None    # GPU pool (CUDA), default 4 GiB
    pool_policy: str = "lookahead"       # eviction: "lookahead" (queue-aware) or "lru"
    chunk_tokens: int | None = None      # pool slot size in tokens (default: the store's longest chunk)
    drop_page_cache: bool = False        # read shards past the page cache (cold-start benchmarks)
    measure_stall: bool = False          # time the compute stream's waits on layer copies (benchmarks)
    cold_plan: bool = True               # tiered: prefill cold chunks instead of reading them when that is sooner
                                         # (runtime/coldplan.py); False: always read them
    warmup: bool = True                  # one fused prefill at start (kernels, allocator, compiles),
                                         # so the first request's TTFT is the steady-state one
    warmup_chunks: int | None = None     # chunks in it (None: WARMUP_CHUNKS on CUDA, where it builds the attention
                                         # plans of requests of that size (runtime/shape_buckets.py); 1 on the CPU)

    def __post_init__(self):
        if self.warmup_chunks is not None and self.warmup_chunks < 1:
            raise ValueError(f"warmup_chunks must be >= 1 (or None for the default), got {self.warmup_chunks}; "
                             "warmup=False turns the warm-up off")


class ReleaseView:
    """One opened release: its store, chunk records, retriever and prefix; counts its live requests."""

    def __init__(self, store: Store, lm: LoadedModel, verify: bool):
        store.check_model(lm.spec.fingerprint, dtype_name(lm.spec.dtype))
        self.store = store
        self.release = store.release
        self.prompt = PromptTemplate.from_manifest(store.manifest["prompt"])   # PromptRuleError: rebuild
        self.prefix_id = store.prefix_id
        self.prefix_len = store.record(self.prefix_id).n_tokens
        self.records = store.records()
        self._retriever: BM25Retriever | None = None
        self.live = 0

    @property
    def retriever(self) -> BM25Retriever:
        """BM25 over the chunk texts, built on first use (a host that names chunk ids never pays for it)."""
        if self._retriever is None:
            self._retriever = BM25Retriever([r.text for r in self.records])
        return self._retriever

    def chunk_ids(self) -> set[str]:
        return {self.prefix_id, *(r.chunk_id for r in self.records)}

    def retrieve(self, question: str, k: int) -> list[tuple[str, float]]:
        """The k best distinct chunks for `question`: [(chunk id, BM25 score)], best first; chunks
        with score 0 (no term in common) are left out unless no chunk matched. Identical text in
        several documents is one chunk id on several index rows: asked once."""
        out: dict[str, float] = {}
        for i, score in self.retriever.top(question, len(self.records)):
            out.setdefault(self.records[i].chunk_id, float(score))
            if len(out) == k:
                break
        hits = list(out.items())
        matched = [h for h in hits if h[1] > 0]
        # chunks that share no term with the question are noise a small model answers from;
        # keep them only when nothing matched at all (the engine then says so)
        return matched or hits


@dataclass
class _Work:
    """A request on its way through the scheduler."""

    request: FusionRequest
    handle: RequestHandle
    view: ReleaseView
    chunk_ids: list[str]
    question_ids: torch.Tensor           # [Q]
    submitted: float
    compare: bool = False
    prefill_only: bool = False
    selector: str = "kvfuse"             # what runs: the request's, or "full" where fusion can't win
    notes: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    answer: Answer | None = None
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0                     # characters of the answer text already streamed
    t_first: float | None = None


class FusionEngine:
    """Serve questions from a kvfuse cache with fused prefill + batched decode. Thread-safe.

    cache_dir: a kvfuse cache (`kvfuse build-cache`); release: pin one release (no hot reload).
    Raises `kvfuse.loader.errors.StoreError` subclasses for a missing/damaged cache or a cache
    built with another model (`ModelMismatchError`).
    """

    def __init__(self, cache_dir, lm: LoadedModel, release: str | None = None, verify: bool = True,
                 config: EngineConfig | None = None):
        self.config = config or EngineConfig(verify=verify)
        self.cache_dir = cache_dir if is_url(cache_dir) else Path(cache_dir)  # a URL: one GET of CURRENT per reload check
        self.lm = lm
        self.pinned = release is not None
        use_kvfuse_attention(lm.model)
        self._view = ReleaseView(Store.open(cache_dir, release), lm, self.config.verify)
        self._views = [self._view]
        self._checked = time.monotonic()
        c = self.config
        self.source = make_source(self._view.store, lm, kind=c.source, verify=c.verify, host_bytes=c.host_pool_bytes,
                                  gpu_bytes=c.gpu_pool_bytes, policy=c.pool_policy, chunk_tokens=c.chunk_tokens,
                                  drop_page_cache=c.drop_page_cache, measure_stall=c.measure_stall,
                                  **({} if c.cold_plan else {"cold_plan": False}))
        self._eos = _eos_ids(lm)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pending: collections.deque[_Work] = collections.deque()
        self._running: dict[str, _Work] = {}
        self._closing = False
        self.counters = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="kvfuse-engine", daemon=True)
        self._thread.start()
        if self.config.warmup:
            self._warm_up()

    def _warm_up(self) -> None:
        """A fused prefill at start, not counted in stats: on CUDA of the first WARMUP_CHUNKS chunks
        with a WARMUP_QUESTION_TOKENS-token question, the default selector and ratio (a request of
        the default top-k's size, whose attention plans then exist: cuDNN builds one per new shape,
        up to ~1 s each); on the CPU (no plans) of the first chunk with a two-token question.
        On CUDA it runs WARMUP_RUNS times: the first run is a cold request (nothing pooled yet), which
        the cold plan may answer with a plain prefill of every chunk, building nothing of the fused
        path; the second finds its chunks pooled and runs the warm path (the loader's gather, the
        selector's passes), whose first run in a process cost ~1 s on the H200 (stop 26)."""
        view = self._view
        if not view.records:
            return
        cuda = self.lm.model.device.type == "cuda"
        n = self.config.warmup_chunks if self.config.warmup_chunks is not None else (WARMUP_CHUNKS if cuda else 1)
        chunks = [r.chunk_id for r in view.records[:n]]
        question = view.store.read(chunks[0], verify=False).tokens[-(WARMUP_QUESTION_TOKENS if cuda else 2):].tolist()
        try:
            for _ in range(WARMUP_RUNS if cuda else 1):
                self.fused_prefill(FusionRequest(question_ids=question, chunk_ids=chunks,
                                                 **({} if cuda else {"ratio": 0.5})))
        except Exception as exc:  # noqa: BLE001 - a warm-up never keeps the engine from serving; it says why
            warnings.warn(f"the engine's warm-up request failed ({type(exc).__name__}: {exc}); the first requests "
                          f"will pay for what it would have prepared", stacklevel=2)
        self.counters.clear()
        self.source.stats.__init__()

    # ---- the public API ------------------------------------------------------------------
    @property
    def release(self) -> str:
        """The release new requests read."""
        return self._current_view().release

    @property
    def store(self) -> Store:
        return self._current_view().store

    @property
    def records(self):
        return self._current_view().records

    @property
    def prompt(self) -> PromptTemplate:
        """The current release's prompt template (chat head, question template, separator)."""
        return self._current_view().prompt

    @property
    def prefix(self):
        """The current release's shared prefix chunk (`ChunkData`)."""
        view = self._current_view()
        return view.store.read(view.prefix_id, verify=self.config.verify)

    @property
    def model_name(self) -> str:
        return self.lm.spec.name

    def retrieve(self, question: str, top_k: int) -> list[str]:
        """Chunk ids of the `top_k` chunks most relevant to `question` (BM25), best first."""
        return [cid for cid, _ in self._current_view().retrieve(question, top_k)]

    def question_ids(self, question: str, view: ReleaseView | None = None) -> torch.Tensor:
        """[Q] token ids of the question as the prompt template places it (no control tokens from
        the question's text)."""
        return (view or self._current_view()).prompt.question_ids(self.lm.tokenizer, question)

    def submit(self, request: FusionRequest, *, compare: bool = False) -> RequestHandle:
        """Validate and enqueue a request; its chunks start loading now. Raises RequestError."""
        return self._enqueue(self._admit(request, compare=compare))

    def _enqueue(self, work: "_Work") -> RequestHandle:
        with self._lock:
            if self._closing:
                self.source.cancel(work.request.request_id)
                raise RuntimeError("the engine is closing; no new requests")
            work.view.live += 1
            self._pending.append(work)
            self._wake.notify()
        return work.handle

    def ask(self, question: str, top_k: int = 4, selector: str = "kvfuse", ratio: float = 0.15,
            max_new_tokens: int = 48, chunk_ids: list[str] | None = None, compare: bool = False,
            on_overflow: str = "error") -> Answer:
        """Blocking convenience: submit a question and wait for its whole answer. compare: also run a
        full prefill of the same prompt and report its answer, TTFT and the first-token KL.
        on_overflow: "error" (RequestError before any work) or "drop" the least relevant chunks."""
        req = FusionRequest(question=question, top_k=top_k, selector=selector, ratio=ratio,
                            max_new_tokens=max_new_tokens, chunk_ids=chunk_ids, on_overflow=on_overflow)
        return self.submit(req, compare=compare).result()

    def prefill(self, question: str | FusionRequest, **kw) -> tuple[object, torch.Tensor, FusedLayout]:
        """Fused prefill only, for hosts that decode themselves (e.g. `model.generate`).

        Returns (transformers Cache of the whole prompt, first-token logits [V] float32, layout);
        generation continues at position `layout.total_len`."""
        result = self.fused_prefill(question, **kw)
        return result.cache, result.logits, result.layout

    def fused_prefill(self, question: str | FusionRequest, **kw) -> FusionResult:
        """`prefill` with the driver's whole result: also the recomputed positions and the timings
        (open_s / select_s / recompute_s / total_s, tier counts, copy and stall times with
        `EngineConfig.measure_stall`). The benchmarks time this."""
        req = question if isinstance(question, FusionRequest) else FusionRequest(question=question, **kw)
        return self.submit_prefill(req).result()

    def submit_prefill(self, request: FusionRequest) -> RequestHandle:
        """Enqueue a prefill-only request (its chunks start loading now); the handle's result is
        the driver's `FusionResult`."""
        return self._enqueue(self._admit(request, prefill_only=True))

    def stats(self) -> dict:
        """Counters for metrics: requests, tokens reused / recomputed / generated, queue depth,
        running requests, the source's tier hits and bytes loaded, the current release."""
        with self._lock:
            out = dict(self.counters)
            out.update(queue_depth=len(self._pending), running=len(self._running), release=self._view.release)
        out["source"] = self.source.stats.as_dict()
        return out

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests; queued and running ones finish; then release the loader."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- admission -----------------------------------------------------------------------
    def _current_view(self) -> ReleaseView:
        """The view for new requests, reopening the store if CURRENT moved (hot reload)."""
        if self.pinned:
            return self._view
        now = time.monotonic()
        if now - self._checked < self.config.reload_interval_s:
            return self._view
        self._checked = now
        current = current_of(self.cache_dir) if is_url(self.cache_dir) else read_current(self.cache_dir)
        if current is None or current == self._view.release:
            return self._view
        store = Store.open(self.cache_dir, current)
        if not self.source.accepts(store):  # another --kv-dtype: the pools can't hold its chunks
            if self.counters["kv_dtype_refusals"] == 0:
                log.warning("release %s stores %s KV but this engine's pools hold %s KV; still serving %s. "
                            "Restart the engine to serve it.", current, store.codec.name,
                            self._view.store.codec.name, self._view.release)
            self.counters["kv_dtype_refusals"] += 1
            store.close()
            return self._view
        view = ReleaseView(store, self.lm, self.config.verify)
        with self._lock:
            if view.release != self._view.release:
                self._view = view
                self._views.append(view)
                self.counters["reloads"] += 1
                self._drop_idle_views()
        return self._view

    def _drop_idle_views(self) -> None:
        """Forget releases no request reads any more; pools drop chunks only they referenced."""
        live = [v for v in self._views if v is self._view or v.live > 0]
        if len(live) != len(self._views):
            self._views = live
            self.source.retain(set().union(*(v.chunk_ids() for v in live)))

    def _admit(self, req: FusionRequest, compare: bool = False, prefill_only: bool = False) -> _Work:
        if req.question_ids is not None:
            if req.chunk_ids is None:
                raise RequestError("chunk_ids", "give chunk_ids with question_ids: retrieval needs the question's text")
            if not len(req.question_ids) or not all(isinstance(t, int) and t >= 0 for t in req.question_ids):
                raise RequestError("question_ids", "must be a non-empty list of token ids")
            question = None
        else:
            question = req.question_text()
        if req.selector not in SELECTORS:
            raise RequestError("selector", f"unknown selector {req.selector!r}; choose from {', '.join(SELECTORS)}")
        if not isinstance(req.ratio, (int, float)) or not 0.0 <= req.ratio <= 1.0:
            raise RequestError("ratio", f"the recompute ratio is a fraction of context tokens in [0, 1], got {req.ratio!r}")
        if not isinstance(req.max_new_tokens, int) or not 1 <= req.max_new_tokens <= self.config.max_new_tokens_limit:
            raise RequestError("max_new_tokens", f"must be an integer in [1, {self.config.max_new_tokens_limit}]")
        if not isinstance(req.temperature, (int, float)) or req.temperature < 0:
            raise RequestError("temperature", "must be >= 0 (0: greedy)")
        if not isinstance(req.top_p, (int, float)) or not 0.0 < req.top_p <= 1.0:
            raise RequestError("top_p", "must be in (0, 1]")
        view = self._current_view()
        notes, scores = [], None
        if req.chunk_ids is None:
            if not isinstance(req.top_k, int) or req.top_k < 1:
                raise RequestError("top_k", "must be an integer >= 1")
            hits = view.retrieve(question, req.top_k)                        # [(chunk id, BM25 score)]
            chunk_ids, scores = [c for c, _ in hits], [x for _, x in hits]
            if not view.retriever.matches(question):
                notes.append("retrieval: none of the question's search terms (stop words are left out) occurs "
                             "in any chunk, so these chunks are arbitrary")
            else:
                if len(hits) < req.top_k:
                    notes.append(f"retrieval: {len(hits)} of the {req.top_k} chunks asked for share a term with the "
                                 "question")
                absent = view.retriever.missing(question)
                if absent:
                    shown = ", ".join(repr(t) for t in absent[:3]) + (" ..." if len(absent) > 3 else "")
                    notes.append(f"retrieval: {shown} occur{'s' if len(absent) == 1 else ''} in no chunk of this "
                                 "release, so the chunks matched the question's other terms only; the answer may "
                                 "not be in the corpus")
        else:
            if not isinstance(req.chunk_ids, list) or not all(isinstance(c, str) for c in req.chunk_ids):
                raise RequestError("chunk_ids", "must be a list of chunk id strings")
            unknown = [c for c in req.chunk_ids if c not in view.store or c == view.prefix_id]
            if unknown:
                raise RequestError("chunk_ids", f"unknown chunk id(s) {unknown[:3]} in release {view.release} "
                                   "(`kvfuse inspect CACHE --chunks` lists a release's chunk ids)")
            chunk_ids = list(req.chunk_ids)
        question_ids = (torch.tensor(req.question_ids) if question is None else self.question_ids(question, view))
        if req.on_overflow not in ("error", "drop"):
            raise RequestError("on_overflow", "must be 'error' or 'drop'")
        try:  # before any work: the prompt fits the model's positions, and fusion can win over a full prefill
            plan = plan_request(self.lm, view.prefix_len, [view.store.record(c).n_tokens for c in chunk_ids],
                                len(question_ids), 0 if prefill_only else req.max_new_tokens, req.selector,
                                req.ratio, req.on_overflow)
        except ContextOverflowError as e:
            raise RequestError("chunk_ids" if req.chunk_ids is not None else "top_k", str(e)) from None
        chunk_ids = [chunk_ids[i] for i in plan.kept]
        scores = [scores[i] for i in plan.kept] if scores is not None else None
        handle = RequestHandle(req, cancel=self._cancel)
        work = _Work(req, handle, view, chunk_ids, question_ids, time.perf_counter(), compare, prefill_only,
                     selector=plan.selector, notes=notes + plan.notes, scores=scores)
        self.source.submit(req.request_id, view.store, [view.prefix_id, *chunk_ids])
        return work

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            for work in list(self._pending):
                if work.handle is handle:
                    self._pending.remove(work)
                    self.source.cancel(work.request.request_id)
                    self._retire(work, "cancelled")
                    return
        # running: the scheduler stops it at its next step

    # ---- the scheduler -------------------------------------------------------------------
    def _loop(self) -> None:
        batch = DecodeBatch(self.lm)
        while True:
            with self._lock:
                while not self._pending and not len(batch) and not self._closing:
                    self._wake.wait()
                if self._closing and not self._pending and not len(batch):
                    return
                work = self._pending.popleft() if self._pending and len(batch) < self.config.max_batch else None
            if work is not None:
                self._start(work, batch)
            if len(batch):
                self._step(batch)

    def _start(self, work: _Work, batch: DecodeBatch) -> None:
        """Fused prefill of one request; it joins the decode batch unless it is already done."""
        req = work.request
        try:
            with self._lock:
                self._running[req.request_id] = work
            t0 = time.perf_counter()
            result = self.source.fuse(self.lm, req.request_id, work.question_ids, work.selector, req.ratio)
            logits = result.logits
            now = time.perf_counter()
            work.t_first = now
            if work.prefill_only:
                self._retire(work, None, value=result)
                return
            work.answer = Answer(text="", chunk_ids=work.chunk_ids, n_reused=result.n_reused,
                                 n_recomputed=result.n_recomputed, n_question=len(work.question_ids),
                                 ttft_s=now - work.submitted, release=work.view.release,
                                 doc_ids=[work.view.store.record(c).doc_id for c in work.chunk_ids],
                                 prefill_s=now - t0, fused=work.selector != "full", timings=dict(result.timings),
                                 retrieval_scores=work.scores, notes=list(work.notes) + cold_plan_notes(result.timings))
            self.counters["tokens_reused"] += result.n_reused
            self.counters["tokens_recomputed"] += result.n_recomputed + len(work.question_ids)
            if work.compare:
                self._compare(work, logits)
            gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
            first = sample(logits, req.temperature, req.top_p, gen)
            row = DecodeRow(result.cache, result.layout.total_len, first, req.max_new_tokens - 1,
                            req.temperature, req.top_p, gen, tag=work)
            if self._accept(work, first) and row.budget > 0:
                batch.add(row)
            else:
                self._retire(work, self._reason(work))
        except Exception as e:  # the request fails; the engine stays up
            self.source.cancel(req.request_id)
            self._retire(work, None, error=e)

    def _step(self, batch: DecodeBatch) -> None:
        try:
            batch.step()
        except Exception as e:
            for row in batch.rows:
                self._retire(row.tag, None, error=e)
            batch.remove(list(batch.rows))
            return
        finished = []
        for row in batch.rows:
            work: _Work = row.tag
            if work.handle.cancelled:
                finished.append(row)
                self._retire(work, "cancelled")
            elif not self._accept(work, row.token) or row.budget <= 0:
                finished.append(row)
                self._retire(work, self._reason(work))
        batch.remove(finished)

    def _accept(self, work: _Work, token: int) -> bool:
        """Take a generated token; stream the new text. False once the request is done (EOS, stop)."""
        if token in self._eos:
            work.answer.finish_reason = "stop"
            return False
        work.tokens.append(token)
        text = self.lm.tokenizer.decode(work.tokens, skip_special_tokens=True)
        stops = [s for s in work.request.stop if s]
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            work.answer.text, work.answer.finish_reason = text[:cut], "stop"
            work.handle._push(text[work.emitted:cut])
            work.emitted = cut
            return False
        work.answer.text = text
        # hold back a partial UTF-8 character and anything that may still become a stop string
        safe = len(text) - max([len(s) - 1 for s in stops] + [0])
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > work.emitted:
            work.handle._push(text[work.emitted:safe])
            work.emitted = safe
        work.answer.finish_reason = "length"
        return True

    @staticmethod
    def _reason(work: _Work) -> str:
        return work.answer.finish_reason

    def _retire(self, work: _Work, reason: str | None, value=None, error: BaseException | None = None) -> None:
        with self._lock:
            self._running.pop(work.request.request_id, None)
            work.view.live -= 1
            if work.view is not self._view and work.view.live == 0:
                self._drop_idle_views()
        if error is not None:
            self.counters["requests_failed"] += 1
            work.handle._finish(error=error)
            return
        if value is not None:
            self.counters["requests_prefilled"] += 1
            work.handle._finish(value)
            return
        answer = work.answer or Answer(text="", chunk_ids=work.chunk_ids, n_reused=0, n_recomputed=0,
                                       n_question=len(work.question_ids), ttft_s=0.0, release=work.view.release)
        answer.finish_reason = reason or answer.finish_reason
        answer.token_ids = list(work.tokens)
        if work.emitted < len(answer.text):
            work.handle._push(answer.text[work.emitted:])
        answer.total_s = time.perf_counter() - work.submitted
        # each request ends in exactly one state
        self.counters["requests_cancelled" if reason == "cancelled" else "requests_completed"] += 1
        self.counters["tokens_generated"] += len(work.tokens)
        work.handle._finish(answer)

    def _compare(self, work: _Work, logits: torch.Tensor) -> None:
        """The same prompt by a plain full prefill: its answer, TTFT and the first-token KL."""
        store = work.view.store
        chunks = [store.read(c, verify=self.config.verify).tokens for c in [work.view.prefix_id, *work.chunk_ids]]
        all_ids = torch.cat([*chunks, work.question_ids.int()])
        t0 = time.perf_counter()
        cache, full_logits = full_prefill(self.lm, all_ids)
        work.answer.full_ttft_s = time.perf_counter() - t0
        tokens = greedy(self.lm, cache, full_logits, len(all_ids), work.request.max_new_tokens)
        req = work.request
        if req.temperature == 0 and not any(req.stop):   # a greedy answer with no stop strings: comparable token for token
            work.answer.full_token_ids = tokens[:-1] if tokens and tokens[-1] in self._eos else list(tokens)  # no EOS
        work.answer.full_text = self.lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        work.answer.first_token_kl = float(torch.nn.functional.kl_div(
            logits.log_softmax(-1), full_logits.log_softmax(-1), log_target=True, reduction="sum"))
