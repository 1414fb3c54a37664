"""Checks the engine runs before any model work (issue 13 items 6 and 7).

    plan = plan_request(lm, n_prefix, chunk_lens, n_question, max_new_tokens, selector, ratio)  # both checks
    kept = check_fits(lm, n_prefix, chunk_lens, n_question, max_new_tokens)   # or ContextOverflowError
    if not should_fuse(n_context, n_question, selector, ratio): ...           # a plain prefill is cheaper
    probe_layout, probe_q = probe_view(layout, question_ids)                   # the selectors' bounded probe

* Context overflow: a prompt of P + C + Q tokens that then decodes M more needs
  positions 0 .. P+C+Q+M-1; a model only knows `max_position_embeddings` of them
  and silently degrades past that. `check_fits` raises, or (policy "drop") drops
  the least relevant chunks (the last in retrieval order) until the rest fit,
  logs it and returns what was kept, so the answer can report it.
* Fusion that can't win: the fused path runs the selector's question probes and
  then recomputes S = ratio x C context tokens plus the Q question tokens; a plain
  prefill over the stored prefix runs C + Q tokens. With a long question over a
  short context the probes and the question dominate, and fusion is slower than
  the prefill it replaces. `should_fuse` compares the two in tokens through the
  model (attention's share is ignored: both paths attend over the same keys).
* Probe cost: a question probe runs the question over the fused cache; it runs at
  most the last `PROBE_QUESTION_TOKENS` question tokens (placed right after the
  context), so a selector's cost is bounded whatever the question's length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .layout import FusedLayout

log = logging.getLogger(__name__)

PROBE_QUESTION_TOKENS = 128  # the question tokens a selector's probe runs (the last ones: the question and the turn end)
FUSE_MARGIN = 0.9            # fuse only when it runs < 90% of the prefill's tokens (assembly and selection aren't free)
OVERFLOW_POLICIES = ("error", "drop")

# Selector -> (question probes, share of the model's layers a probe runs, context passes at one layer's depth).
# Probe i of k runs the tokens chosen so far (about i/k of the budget) plus the probed question tokens.
_PROBES = {
    "full": (0, 0.0, 0),
    "reuse": (0, 0.0, 0),
    "epic": (0, 0.0, 0),
    "cacheblend": (0, 0.0, 1),   # layer-1 K/V of every context token: C tokens x 2 layers
    "a3": (1, 0.1, 0),           # probes layers 0..1 only (runtime/fusion.py PROBE_LAYERS)
    "qattn": (1, 1.0, 0),
    "prophet": (2, 1.0, 0),
    "kvfuse": (3, 1.0, 0),       # selectors/kvfuse_staged.py STAGES (the default rule; incremental probes)
    "kvfuse-staged": (3, 1.0, 0),  # the same
    "kvfuse-joint-probes": (3, 1.0, 0),
    "kvfuse-inc": (3, 1.0, 0),
    "kvfuse-1probe": (1, 1.0, 0),  # one plain probe through selectors/kvfuse.py PROBE_SHARE of the layers
    "kvfuse-gradual": (1, 0.1, 0),  # a3's probe; the narrowing runs inside the recompute at equal FLOPs
}

# Selectors whose probes run each pick once, into the run's working cache (selectors/kvfuse_staged.py):
# "probes": the final recompute runs every pick again; "kept": only those the probes did not run.
# Probe i of k of the others runs every pick so far (about i/k of the budget).
_INCREMENTAL = {"kvfuse": "probes", "kvfuse-staged": "probes", "kvfuse-inc": "kept"}


class ContextOverflowError(ValueError):
    """The prompt (plus the tokens to generate) needs more positions than the model has."""


def check_fits(lm, n_prefix: int, chunk_lens: Sequence[int], n_question: int, max_new_tokens: int,
               policy: str = "error") -> list[int]:
    """Indices of the chunks (retrieval order, most relevant first) that fit the model's positions.

    Needs n_prefix + sum(chunk_lens) + n_question + max_new_tokens <= lm.spec.max_positions.
    policy "error": raise ContextOverflowError when it doesn't; "drop": drop chunks from the
    end (least relevant) until it does, log a warning, and return the kept indices.
    Raises ContextOverflowError (either policy) when the prefix, question and answer alone don't fit,
    ValueError for an unknown policy.
    """
    if policy not in OVERFLOW_POLICIES:
        raise ValueError(f"unknown overflow policy {policy!r}; choose one of {', '.join(OVERFLOW_POLICIES)}")
    limit = int(lm.spec.max_positions)
    fixed = n_prefix + n_question + max_new_tokens
    need = fixed + sum(chunk_lens)
    if need <= limit:
        return list(range(len(chunk_lens)))
    kept, used = [], fixed
    for i, n in enumerate(chunk_lens):
        if used + n > limit:
            break
        kept.append(i)
        used += n
    name = getattr(lm.spec, "name", "the model")
    if fixed > limit:
        raise ContextOverflowError(
            f"the prompt needs {need} positions (prefix {n_prefix} + {len(chunk_lens)} chunks "
            f"{sum(chunk_lens)} + question {n_question} + up to {max_new_tokens} new tokens) but {name} has "
            f"{limit} (max_position_embeddings); even without chunks it needs {fixed}: shorten the question "
            "or lower --max-new-tokens")
    if policy == "error":
        raise ContextOverflowError(
            f"the prompt needs {need} positions (prefix {n_prefix} + {len(chunk_lens)} chunks {sum(chunk_lens)} + "
            f"question {n_question} + up to {max_new_tokens} new tokens) but {name} has {limit} "
            f"(max_position_embeddings): lower --top-k to {len(kept)} or fewer, use smaller chunks "
            "(build-cache --chunk-tokens), shorten the question or lower --max-new-tokens; or let kvfuse drop "
            "the least relevant chunks (FusionEngine.ask(..., on_overflow='drop'))")
    log.warning("context overflow: %d positions needed, %s has %d; dropped the %d least relevant of %d chunks",
                need, name, limit, len(chunk_lens) - len(kept), len(chunk_lens))
    return kept


def fused_tokens(n_context: int, n_question: int, selector: str, ratio: float, n_layers: int | None = None) -> float:
    """Tokens the fused path runs through the model (in full-depth token passes): probes + S + Q."""
    passes, depth, ctx_passes = _PROBES.get(selector, (1, 1.0, 0))  # an unknown selector: one full probe
    selected = ratio * n_context
    q_probe = min(n_question, PROBE_QUESTION_TOKENS)
    kind = _INCREMENTAL.get(selector)
    if kind == "kept":            # the probes' picks and the final pass's add up to the budget
        probes = passes * q_probe * depth
    elif kind == "probes":        # the probes run the picks of all stages but the last, once
        probes = (selected * (passes - 1) / passes + passes * q_probe) * depth
    else:
        probes = sum(selected * i / passes + q_probe for i in range(passes)) * depth if passes else 0.0
    layer_share = 2 / n_layers if n_layers else 0.1
    return probes + ctx_passes * n_context * layer_share + selected + n_question


def should_fuse(n_context: int, n_question: int, selector: str, ratio: float, n_layers: int | None = None) -> bool:
    """True when fusing can beat a plain prefill of the context and question over the stored prefix.

    Token-count arithmetic (`fused_tokens` against n_context + n_question) with FUSE_MARGIN of
    slack for assembly and selection. Selector "full" is the prefill: always False.
    """
    if selector == "full" or n_context <= 0:
        return False
    return fused_tokens(n_context, n_question, selector, ratio, n_layers) < FUSE_MARGIN * (n_context + n_question)


def probe_view(layout: FusedLayout, question_ids: torch.Tensor) -> tuple[FusedLayout, torch.Tensor]:
    """The (layout, question ids [Q']) a question probe runs: the last Q' = min(Q,
    PROBE_QUESTION_TOKENS) question tokens, right after the context (same prefix and chunks)."""
    n = min(len(question_ids), PROBE_QUESTION_TOKENS)
    if n == len(question_ids):
        return layout, question_ids
    return replace(layout, question_len=n), question_ids[-n:]


@dataclass
class RequestPlan:
    kept: list[int]                                  # indices of the chunks to use, retrieval order
    selector: str                                    # the selector to run ("full" when fusion can't win)
    notes: list[str] = field(default_factory=list)   # what was changed, for the answer to report


def plan_request(lm, n_prefix: int, chunk_lens: Sequence[int], n_question: int, max_new_tokens: int,
                 selector: str, ratio: float, on_overflow: str = "error") -> RequestPlan:
    """`check_fits` then `should_fuse` for one request; raises what check_fits raises."""
    kept = check_fits(lm, n_prefix, chunk_lens, n_question, max_new_tokens, on_overflow)
    plan = RequestPlan(kept, selector)
    if len(kept) < len(chunk_lens):
        plan.notes.append(f"dropped the {len(chunk_lens) - len(kept)} least relevant of {len(chunk_lens)} chunks "
                          f"to fit the model's {lm.spec.max_positions} positions")
    n_context = sum(chunk_lens[i] for i in kept)
    if selector != "full" and not should_fuse(n_context, n_question, selector, ratio, lm.spec.n_layers):
        plan.selector = "full"
        plan.notes.append(f"{selector} at ratio {ratio} would run more tokens than a full prefill of the "
                          f"{n_context} context and {n_question} question tokens: ran the full prefill")
    return plan
