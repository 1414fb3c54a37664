"""Token chunker (pipeline stage 2, DESIGN §3 and §7).

A document is cut into chunks of at most ``chunk_tokens`` tokens:

1. The document is trimmed of leading/trailing whitespace and partitioned into
   *paragraphs* (split at whitespace runs holding a blank line) and each
   paragraph into *sentences* (split after ``.``, ``!``, ``?``, ``…`` plus
   closing quotes/brackets, before whitespace; after ``。！？``). Every piece
   keeps the whitespace that precedes it, so the pieces tile the trimmed
   document exactly and ``" word"`` tokenises as it does in running text.
2. Every sentence is tokenised separately as untrusted text
   (``runtime.prompt.encode_texts``: no BOS/EOS, no control tokens; one batched call); a chunk's ``token_ids`` is the concatenation of its
   pieces' ids (DESIGN §7: tokenise pieces separately and concatenate). So
   token counts add up exactly and packing never re-tokenises.
3. Packing: whole paragraphs are packed greedily while they fit. A paragraph
   too big for one chunk gets chunks of its own, packing whole sentences
   greedily. A sentence too big for one chunk is cut at token boundaries
   ("hard cuts"), preferring a line break, then a space, in the last half of
   each window; each window is re-tokenised on its own and re-cut if it grew.

Hence each chunk is either a run of whole paragraphs, a run of whole sentences
of one paragraph, or a piece of one sentence. ``chunk.text ==
doc.text[chunk.char_start:chunk.char_end]``, consecutive chunks are contiguous
(``char_end`` of one is ``char_start`` of the next) and together cover
``doc.text.strip()``; chunks after the first usually begin with the whitespace
that separated them from the previous one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from kvfuse.pipeline.corpus import Document
from kvfuse.runtime.prompt import encode_offsets, encode_texts

__all__ = ["Chunk", "chunk_document", "split_paragraphs", "split_sentences"]


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    chunk_no: int
    token_ids: tuple[int, ...]
    text: str
    char_start: int
    char_end: int

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


# A whitespace run holding at least two newlines contains a blank line.
_WS_RUN = re.compile(r"\s+")
_SENT_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s)|[\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]\u300d\u300f]*")

_Span = tuple[int, int]
_Piece = tuple[int, int, list[int]]  # (char_start, char_end, token ids)


def _trim(text: str) -> _Span:
    start = len(text) - len(text.lstrip())
    end = len(text.rstrip())
    return start, max(start, end)


def split_paragraphs(text: str, start: int = 0, end: int | None = None) -> list[_Span]:
    """Spans tiling ``text[start:end]``, cut before each whitespace run that
    holds a blank line (the run goes with the following paragraph)."""
    end = len(text) if end is None else end
    cuts = [m.start() for m in _WS_RUN.finditer(text, start, end)
            if m.start() > start and m.end() < end and m.group().count("\n") >= 2]
    bounds = [start, *cuts, end]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def split_sentences(text: str, start: int = 0, end: int | None = None) -> list[_Span]:
    """Spans tiling ``text[start:end]``, cut after sentence-final punctuation
    (the following whitespace goes with the next sentence)."""
    end = len(text) if end is None else end
    cuts = []
    for m in _SENT_END.finditer(text, start, end):
        c = m.end()
        if start < c < end and text[c:end].strip() and (not cuts or c > cuts[-1]):
            cuts.append(c)
    bounds = [start, *cuts, end]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class _Encoder:
    """Document text -> ids the way runtime/prompt.py encodes untrusted text (never a control token)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_texts(self.tok, texts)

    def offsets(self, text: str) -> list[tuple[int, int]] | None:
        return encode_offsets(self.tok, text)


def chunk_document(doc: Document, tokenizer: Any, chunk_tokens: int = 512,
                   lead_ids: Sequence[int] = ()) -> list[Chunk]:
    """Cut ``doc`` into chunks of ≤ ``chunk_tokens`` tokens (see module doc).

    ``tokenizer`` is a transformers tokenizer (fast ones use offsets for hard
    cuts; others fall back to a binary search). Text is encoded with
    ``runtime.prompt.encode_texts``: control strings in it never become control
    tokens. ``lead_ids`` (the build passes the prompt's document separator) start
    every chunk's ``token_ids`` and count towards ``chunk_tokens``; ``text`` and
    the char offsets cover the document text only. A whitespace-only document
    gives no chunks; a document longer than any model context is simply cut
    into more chunks. Raises ValueError when ``chunk_tokens`` leaves no room
    after ``lead_ids``.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    lead = tuple(lead_ids)
    if chunk_tokens <= len(lead):
        raise ValueError(f"chunk_tokens={chunk_tokens} leaves no room after the {len(lead)}-token document "
                         "separator; use a larger --chunk-tokens")
    text = doc.text
    start, end = _trim(text)
    if start >= end:
        return []
    enc = _Encoder(tokenizer)
    limit = chunk_tokens - len(lead)

    paragraphs = [split_sentences(text, a, b) for a, b in split_paragraphs(text, start, end)]
    flat = [s for para in paragraphs for s in para]
    flat_ids = enc.ids([text[a:b] for a, b in flat])

    groups: list[list[_Piece]] = []  # each group becomes one chunk
    cur: list[_Piece] = []
    cur_n = 0

    def flush() -> None:
        nonlocal cur, cur_n
        if cur:
            groups.append(cur)
        cur, cur_n = [], 0

    k = 0
    for para in paragraphs:
        pieces = [(a, b, flat_ids[k + i]) for i, (a, b) in enumerate(para)]
        k += len(para)
        para_n = sum(len(p[2]) for p in pieces)
        if para_n <= limit:  # whole paragraph: pack with neighbours
            if cur_n + para_n > limit:
                flush()
            cur.extend(pieces)
            cur_n += para_n
            continue
        flush()  # oversized paragraph: chunks of its own, whole sentences
        for piece in pieces:
            n = len(piece[2])
            if n > limit:
                flush()
                groups.extend([w] for w in _hard_cut(text, piece[0], piece[1], enc, limit))
            else:
                if cur_n + n > limit:
                    flush()
                cur.append(piece)
                cur_n += n
        flush()
    flush()

    chunks = []
    for no, group in enumerate(groups):
        a, b = group[0][0], group[-1][1]
        ids = lead + tuple(t for p in group for t in p[2])
        chunks.append(Chunk(doc.doc_id, no, ids, text[a:b], a, b))
    return chunks


# ------------------------------------------------------------------ hard cuts

def _hard_cut(text: str, start: int, end: int, enc: _Encoder, limit: int) -> list[_Piece]:
    """Cut ``text[start:end]`` (more than ``limit`` tokens) into windows of
    ≤ ``limit`` tokens, each tokenised on its own."""
    offs = enc.offsets(text[start:end])
    if offs is None:
        spans = _cuts_by_search(text, start, end, enc, limit)
    else:
        spans = _cuts_by_offsets(text, start, end, offs, limit)
    out: list[_Piece] = []
    for (a, b), ids in zip(spans, enc.ids([text[a:b] for a, b in spans])):
        if len(ids) <= limit:
            out.append((a, b, ids))
        elif (a, b) == (start, end):
            raise ValueError(f"cannot cut text at chars {a}..{b} into pieces of ≤ {limit} tokens")
        else:  # re-tokenised alone it grew past the limit: cut it again
            out.extend(_hard_cut(text, a, b, enc, limit))
    return out


def _cuts_by_offsets(text: str, start: int, end: int, offs: list[tuple[int, int]], limit: int) -> list[_Span]:
    n = len(offs)
    spans: list[_Span] = []
    pos, first = start, 0  # current window: chars from pos, tokens from first
    while n - first > limit:
        best = None
        lo_half = first + max(1, limit // 2)
        # candidate k: cut before token k, at the end of token k-1
        for prefer in (2, 1, 0):  # 2: line break, 1: whitespace, 0: any legal cut
            lo = lo_half if prefer else first + 1
            for k in range(first + limit, lo - 1, -1):
                prev_end, nxt_start = offs[k - 1][1], offs[k][0]
                c = start + prev_end
                if prev_end > nxt_start or not pos < c < end:
                    continue  # tokens share a character (e.g. bytes of one emoji)
                gap = text[c:start + max(nxt_start, prev_end) + 1]
                if prefer == 2 and "\n" not in gap:
                    continue
                if prefer == 1 and not (gap[:1].isspace() or text[c - 1].isspace()):
                    continue
                best = (k, c)
                break
            if best:
                break
        if best is None:
            raise ValueError(f"cannot cut text at chars {pos}..{end} into pieces of ≤ {limit} tokens")
        k, c = best
        spans.append((pos, c))
        pos, first = c, k
    spans.append((pos, end))
    return spans


def _cuts_by_search(text: str, start: int, end: int, enc: _Encoder, limit: int) -> list[_Span]:
    """Fallback without offsets: largest prefix that fits, found by bisection
    (snapped back to a space when one is in the last half)."""
    spans: list[_Span] = []
    pos = start
    while pos < end:
        hi = min(end, pos + 64 * limit)
        if len(enc.ids([text[pos:hi]])[0]) <= limit and hi == end:
            spans.append((pos, end))
            break
        lo = pos + 1  # invariant: text[pos:lo] fits (assumed for one char), text[pos:hi+1] doesn't
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(enc.ids([text[pos:mid]])[0]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        sp = text.rfind(" ", pos + (lo - pos) // 2, lo)
        cut = sp if sp > pos else lo
        spans.append((pos, cut))
        pos = cut
    return spans
