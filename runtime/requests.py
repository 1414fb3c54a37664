"""Requests to the fusion engine and the handles that deliver their answers.

    handle = engine.submit(FusionRequest(question="Who built the Orrin Bridge?", top_k=4))
    answer = handle.result()                 # blocking
    answer = await handle                    # in a coroutine
    for text in handle.stream(): ...         # text deltas as tokens are generated
    async for text in handle.astream(): ...
    handle.cancel()                          # leaves the queue; a running request stops at the next step

A request is validated by the engine at `submit`; anything wrong raises `RequestError`
naming the field, before any work (a server turns it into a 4xx).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import uuid
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request the engine can't serve as given. `field` names the offending field
    (`question`, `messages`, `chunk_ids`, `selector`, `ratio`, ...); `status` is the HTTP
    status a server should answer with (400: every error the engine raises today)."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass
class FusionRequest:
    """One question over retrieved (or given) chunks.

    question / messages / question_ids: the question text, or OpenAI-style chat messages
        (`[{"role": "user", "content": "..."}]`): the last user message is the question, earlier
        turns and system messages are put before it as plain text (the chat template's head is
        the store's precomputed prefix, shared by every request); or the question's token ids
        as they follow the chunks (the template's question part and suffix included).
    chunk_ids: the chunks to read, in prompt order; None: retrieve `top_k` by the question.
    selector, ratio: which context tokens to recompute; ratio = fraction of context tokens in [0, 1].
    max_new_tokens, temperature, top_p, stop, seed: generation (temperature 0 = greedy).
    """

    question: str | None = None
    messages: list[dict] | None = None
    question_ids: list[int] | None = None   # pre-tokenized question, template applied (needs chunk_ids)
    chunk_ids: list[str] | None = None
    top_k: int = 4
    selector: str = "kvfuse"
    ratio: float = 0.15
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    on_overflow: str = "error"         # prompt longer than the model: "error", or "drop" the least relevant chunks
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def question_text(self) -> str:
        """The text that goes into the question template; raises RequestError if there is none."""
        if self.messages is None:
            if not isinstance(self.question, str) or not self.question.strip():
                raise RequestError("question", "give a non-empty question (or chat messages)")
            return self.question
        if self.question is not None:
            raise RequestError("messages", "give either question or messages, not both")
        if not isinstance(self.messages, list) or not self.messages:
            raise RequestError("messages", "must be a non-empty list of {role, content} objects")
        lines = []
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}]", "each message needs a role of system, user or assistant")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise RequestError(f"messages[{i}].content", "must be a string")
            lines.append((m["role"], content))
        if lines[-1][0] != "user" or not lines[-1][1].strip():
            raise RequestError("messages", "the last message must be a non-empty user message")
        if len(lines) == 1:
            return lines[0][1]
        earlier = "\n".join(f"{role}: {text}" for role, text in lines[:-1] if text.strip())
        return f"{earlier}\n\n{lines[-1][1]}" if earlier else lines[-1][1]


@dataclass
class Answer:
    """What a request produced. Times in seconds; token counts are of the fused prompt."""

    text: str
    chunk_ids: list[str]
    n_reused: int                      # prefix + context tokens whose stored KV was kept
    n_recomputed: int                  # context tokens recomputed
    n_question: int                    # question tokens (always computed)
    ttft_s: float                      # submit -> first token's logits (queueing included)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"        # "stop" (EOS or a stop string), "length", "cancelled"
    release: str | None = None         # the store release the request read
    doc_ids: list[str] = field(default_factory=list)
    prefill_s: float | None = None     # the fused prefill alone (load + select + recompute)
    total_s: float | None = None       # submit -> last token
    fused: bool = True                 # False: the engine ran a plain prefill (cost model or selector "full")
    timings: dict = field(default_factory=dict)   # the driver's: select_s, recompute_s, hot/warm/cold chunks, ...
    retrieval_scores: list[float] | None = None   # BM25 score of each chunk (None: chunks given by the caller)
    notes: list[str] = field(default_factory=list)  # what the engine changed: chunks dropped, plain prefill, no match
    full_text: str | None = None       # with compare: the full prefill's answer
    full_ttft_s: float | None = None
    first_token_kl: float | None = None
    full_token_ids: list[int] | None = None   # with compare, for a greedy request without stop strings:
                                              # the full prefill's greedy answer, token ids (no EOS)

    @property
    def n_generated(self) -> int:
        return len(self.token_ids)

    @property
    def first_difference(self) -> int | None:
        """With compare: the index of the first generated token where this answer leaves the full
        prefill's greedy one (a shorter answer leaves it where it ends); None where the two are the same
        tokens or nothing was compared (no compare, or a sampled request or one with stop strings,
        whose answer the full prefill's greedy one is not comparable with: `full_token_ids` None)."""
        if self.full_token_ids is None:
            return None
        ours, full = self.token_ids, self.full_token_ids
        for i, (a, b) in enumerate(zip(ours, full)):
            if a != b:
                return i
        return None if len(ours) == len(full) else min(len(ours), len(full))


_END = object()


class RequestHandle:
    """The caller's side of a submitted request. Thread-safe; usable from threads and asyncio."""

    def __init__(self, request: FusionRequest, cancel=None):
        self.request = request
        self.request_id = request.request_id
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._deltas: queue.Queue = queue.Queue()
        self._async: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._lock = threading.Lock()
        self._history: list[str] = []        # deltas so far, replayed to late async subscribers
        self._closed = False
        self._cancel = cancel
        self.cancelled = False

    # ---- engine side -----------------------------------------------------------------
    def _push(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            self._history.append(text)
            self._deltas.put(text)
            for loop, q in self._async:
                loop.call_soon_threadsafe(q.put_nowait, text)

    def _finish(self, answer: Answer | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._deltas.put(_END)
            for loop, q in self._async:
                loop.call_soon_threadsafe(q.put_nowait, _END)
        if error is not None:
            self._future.set_exception(error)
        else:
            self._future.set_result(answer)

    # ---- caller side -----------------------------------------------------------------
    def result(self, timeout: float | None = None) -> Answer:
        """Block until the answer is complete; re-raises the request's error."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def stream(self):
        """Yield text deltas until the answer is complete (then `result()` has the whole answer)."""
        while True:
            item = self._deltas.get()
            if item is _END:
                self._deltas.put(_END)  # a second iteration ends at once
                return
            yield item

    async def astream(self):
        """Async `stream()`: text deltas, delivered on the caller's event loop."""
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            for text in self._history:
                q.put_nowait(text)
            if self._closed:
                q.put_nowait(_END)
            else:
                self._async.append((asyncio.get_running_loop(), q))
        while True:
            item = await q.get()
            if item is _END:
                return
            yield item

    def cancel(self) -> None:
        """Drop the request: a queued one leaves the queue (its prefetches are dropped), a running
        one stops at its next decode step with finish_reason "cancelled"."""
        self.cancelled = True
        if self._cancel is not None:
            self._cancel(self)
