"""Token selectors: which context tokens to recompute (DESIGN §4).

Every selector has one signature:

    select(ctx: SelectionContext, budget: int) -> LongTensor [S]   # absolute positions, sorted

`budget` is the number of context tokens to recompute (ratio x context length);
the question is always recomputed, so it is not counted and never returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .layout import FusedLayout


@dataclass
class SelectionContext:
    layout: FusedLayout
    # The probe: one pass of the question over the reused cache, giving attention
    # [L, Q, C] from question tokens to context tokens (mean over heads). Computed
    # lazily by the fusion code; selectors that don't need it don't pay for it.
    probe: Callable[[], torch.Tensor]
    saliency: torch.Tensor | None = None  # [S, C] offline prior, chunk order
    cached: dict = field(default_factory=dict)

    def question_attention(self) -> torch.Tensor:
        if "attn" not in self.cached:
            self.cached["attn"] = self.probe()
        return self.cached["attn"]  # [L, Q, C]


def _top(scores: torch.Tensor, budget: int, layout: FusedLayout) -> torch.Tensor:
    """The `budget` highest-scoring context tokens, as sorted absolute positions."""
    budget = max(0, min(budget, scores.numel()))
    idx = scores.topk(budget).indices if budget else scores.new_zeros(0, dtype=torch.long)
    return idx.sort().values + layout.prefix_len


def select_full(ctx: SelectionContext, budget: int) -> torch.Tensor:
    return ctx.layout.context_positions()


def select_reuse(ctx: SelectionContext, budget: int) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


def select_epic(ctx: SelectionContext, budget: int) -> torch.Tensor:
    """EPIC / LegoLink: the first k tokens of every chunk (attention-sink repair)."""
    lay = ctx.layout
    k = budget // max(1, len(lay.chunk_lens))
    picks = [torch.arange(s, s + min(k, n)) for s, n in zip(lay.chunk_starts, lay.chunk_lens)]
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)


def select_a3(ctx: SelectionContext, budget: int, layer: int = 1, window: int = 5) -> torch.Tensor:
    """A3: question-to-context attention at one early layer, pooled over a small window."""
    attn = ctx.question_attention()                     # [L, Q, C]
    scores = attn[min(layer, attn.shape[0] - 1)].sum(0)  # [C]
    pooled = F.max_pool1d(scores[None, None], window, stride=1, padding=window // 2)[0, 0]
    return _top(pooled, budget, ctx.layout)


def select_qattn(ctx: SelectionContext, budget: int) -> torch.Tensor:
    """Question-to-context attention averaged over all layers and question tokens."""
    scores = ctx.question_attention().mean(dim=(0, 1))  # [C]
    return _top(scores, budget, ctx.layout)


SELECTORS: dict[str, Callable[[SelectionContext, int], torch.Tensor]] = {
    "full": select_full,
    "reuse": select_reuse,
    "epic": select_epic,
    "a3": select_a3,
    "qattn": select_qattn,
}


def get_selector(name: str):
    try:
        return SELECTORS[name]
    except KeyError:
        raise ValueError(f"unknown selector {name!r}; choose one of {', '.join(SELECTORS)}") from None
