"""The prompt: its template, the document separator and how text becomes token ids (one owner).

    template = PromptTemplate.of(lm.tokenizer)                       # at build time
    template = PromptTemplate.from_manifest(store.manifest["prompt"])  # at serve time: what the cache was built with
    prefix = template.prefix_ids(tok)                                # [prefix]: the chat template's head
    lead = template.separator_ids(tok)                               # starts every stored chunk
    ids = encode_text(tok, "a document or a question")               # never a control token
    q = template.question_ids(tok, "Who painted it?")                # [question][suffix]

The fused prompt is ``[prefix][sep chunk_1][sep chunk_2]...[question][suffix]``:

* prefix and suffix are the chat template split around the user message
  (`chat_prefix_and_suffix`); they are ours, so their control tokens are real.
* Every stored chunk starts with the document separator (``SEPARATOR``), part of
  the chunk's stored tokens, so chunks of different documents never run together
  ("...code is 12" + "34 apples..." must not read "1234 apples"), in the fused
  cache and in the full-prefill reference alike (both read ``chunk.tokens``).
  The chat formats kvfuse supports have no document header, so there is none.
* Document and question text is *untrusted*: `encode_text` tokenises it with
  special tokens split (``<|im_end|>`` in a document becomes the pieces of the
  string, not the control token), and any control id a tokenizer still produces
  (a word-level vocabulary holding ``<s>``) is replaced by the string's pieces
  one character at a time (or the unknown token). So a document can't close the
  user turn and plant an assistant turn.

``PROMPT_RULE`` names this rule; build.py puts it in every chunk id, so a cache
built under another rule is rebuilt rather than reused.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

log = logging.getLogger(__name__)

PROMPT_RULE = "split-special+sep-v1"  # bump when the separator, template or text encoding changes
QUESTION_TEMPLATE = "\n\nAnswer the question using the documents above.\nQuestion: {question}"
SEPARATOR = "\n\n---\n"  # before every stored chunk (a markdown rule: a boundary to every model)

_SENTINEL = "KVFUSEUSERMESSAGE7f3a9"


class PromptRuleError(ValueError):
    """The cache was built under another prompt rule than this kvfuse uses."""


def chat_prefix_and_suffix(tokenizer) -> tuple[str, str]:
    """Split the chat template around the user message.

    The fused prompt is ``[prefix][chunks][question][suffix]``: prefix is the
    template head up to the user content (system prompt, role markers), suffix
    the rest through the generation prompt. ("", "\\n") without a chat template.
    Raises ValueError when the template doesn't render the user message verbatim.
    """
    if not getattr(tokenizer, "chat_template", None):
        return "", "\n"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render the user message verbatim; "
                         "can't split it into prefix and suffix")
    prefix, suffix = text.split(_SENTINEL)
    return prefix, suffix


# ------------------------------------------------------------------ untrusted text -> ids

def control_ids(tokenizer) -> frozenset[int]:
    """Ids untrusted text must never produce: the special tokens and every added token marked
    special, except the unknown token (what a word outside the vocabulary becomes)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return frozenset(ids)


def _raw_ids(tokenizer, texts: list[str], split: bool = True) -> list[list[int]]:
    out = tokenizer(texts, add_special_tokens=False, split_special_tokens=split, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    return [list(x) for x in out["input_ids"]]


def _safe_pieces(tokenizer, control_id: int, bad: frozenset[int]) -> list[int]:
    """What a control id left in untrusted text becomes: its string tokenised one character at a
    time, control ids dropped; the unknown token when nothing is left (nothing without one)."""
    chars = list(tokenizer.convert_ids_to_tokens(control_id) or "")
    pieces = [t for piece in (_raw_ids(tokenizer, chars) if chars else []) for t in piece if t not in bad]
    unk = getattr(tokenizer, "unk_token_id", None)
    return pieces or ([unk] if unk is not None and unk not in bad else [])


def _defuse(tokenizer, ids: list[int], bad: frozenset[int], offsets=None):
    """Replace each control id in `ids` by `_safe_pieces`; each piece keeps its token's offsets."""
    out, offs = [], []
    for k, i in enumerate(ids):
        pieces = _safe_pieces(tokenizer, i, bad) if i in bad else [i]
        out.extend(pieces)
        if offsets is not None:
            offs.extend([offsets[k]] * len(pieces))
    return out if offsets is None else (out, offs)


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of untrusted texts (documents, questions): no BOS/EOS, never a control id.

    One batched tokenizer call; `control_ids` are removed as described in the module doc.
    """
    if not texts:
        return []
    bad = control_ids(tokenizer)
    return [_defuse(tokenizer, ids, bad) if bad.intersection(ids) else ids
            for ids in _raw_ids(tokenizer, list(texts))]


def encode_text(tokenizer, text: str) -> list[int]:
    """`encode_texts` of one text."""
    return encode_texts(tokenizer, [text])[0]


def encode_offsets(tokenizer, text: str) -> list[tuple[int, int]] | None:
    """Character offsets [start, end) of each of `encode_text(text)`'s tokens (the pieces a control
    string became share its span); None for slow tokenizers, which have no offsets."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    out = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                    return_token_type_ids=False, return_offsets_mapping=True, verbose=False)
    offsets = [tuple(o) for o in out["offset_mapping"]]
    bad = control_ids(tokenizer)
    return _defuse(tokenizer, list(out["input_ids"]), bad, offsets)[1] if bad.intersection(out["input_ids"]) else offsets


# ------------------------------------------------------------------ the template

@dataclass(frozen=True)
class PromptTemplate:
    """[prefix][separator chunk]...[question_template(question)][suffix], as text."""

    prefix: str
    question_template: str
    suffix: str
    separator: str = SEPARATOR
    rule: str = PROMPT_RULE

    @classmethod
    def of(cls, tokenizer) -> "PromptTemplate":
        prefix, suffix = chat_prefix_and_suffix(tokenizer)
        return cls(prefix, QUESTION_TEMPLATE, suffix)

    @classmethod
    def from_manifest(cls, d: dict) -> "PromptTemplate":
        """The template a release was built with (its manifest's "prompt").

        Raises PromptRuleError for a release built under another rule; warns for one
        built before the rule was recorded (its documents may hold live control tokens).
        """
        rule = d.get("rule")
        if rule is None:
            msg = ("this cache was built before kvfuse separated documents and escaped control tokens in "
                   "them; rebuild it with `kvfuse build-cache` (chunk ids changed, so every chunk is recomputed)")
            log.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
            return cls(d["prefix"], d["question_template"], d["suffix"], separator="", rule="")
        if rule != PROMPT_RULE:
            raise PromptRuleError(f"this cache was built with prompt rule {rule!r}, this kvfuse uses "
                                  f"{PROMPT_RULE!r}: rebuild it with `kvfuse build-cache`")
        return cls(d["prefix"], d["question_template"], d["suffix"], d.get("separator", SEPARATOR), rule)

    def to_manifest(self) -> dict:
        return asdict(self)

    def prefix_ids(self, tokenizer) -> tuple[int, ...]:
        """The shared prefix's ids (trusted text: its control tokens are real). Raises ValueError when empty."""
        ids = tuple(_raw_ids(tokenizer, [self.prefix], split=False)[0]) if self.prefix else ()
        if not ids:
            raise ValueError("the shared prefix tokenises to nothing; give the model a chat template")
        return ids

    def separator_ids(self, tokenizer) -> tuple[int, ...]:
        """The ids every stored chunk starts with (the document separator)."""
        return tuple(encode_text(tokenizer, self.separator)) if self.separator else ()

    def question_ids(self, tokenizer, question: str, answer_prefix: str = "") -> torch.Tensor:
        """[Q] long: the question in its template (untrusted), then the suffix (trusted), then
        `answer_prefix` (untrusted; the start of the answer, for evals)."""
        text = encode_text(tokenizer, self.question_template.format(question=question))
        suffix = _raw_ids(tokenizer, [self.suffix], split=False)[0] if self.suffix else []
        tail = encode_text(tokenizer, answer_prefix) if answer_prefix else []
        return torch.tensor(text + suffix + tail, dtype=torch.long)
