"""`kvfuse-1probe` (ours): chunk starts, then one question probe split over chunks by relevance.

Not the default: on the demo's own question it names the wrong painter (docs/selectors.md);
the default `kvfuse` is the staged rule (`kvfuse_staged.py`), whose helpers this module shares.

0. Chunk starts: the first START_TOKENS tokens of every chunk (at most START_SHARE of
   the budget) are taken up front, whatever the question: prefilled right after the
   prefix, a chunk's first tokens differ most from their in-context selves (EPIC's
   observation), and the question's attention leans on them.
1. Relevance: the question's attention to every context token from one pass of the
   question alone over the reused cache (the plain probe every query-driven selector
   shares), summed over question tokens, each layer normalised to sum 1 over the
   context and averaged over the first PROBE_SHARE of the layers.
2. Chunk budget: the rest of the budget is split over the chunks in proportion to each
   chunk's summed relevance (water-filling, capped at its free tokens); the most
   relevant tokens of each chunk are taken.

Cost: one pass of the question's tokens (at most `guards.PROBE_QUESTION_TOKENS`) through
PROBE_SHARE of the layers, before the recompute. The staged rule (`kvfuse_staged.py`)
refines the relevance in three stages instead: on the dev runs (docs/selectors.md) the
single probe's answers tie it at a fraction of its selection cost, but its first-token KL
is worse and it gets the demo's answer wrong.
"""

from __future__ import annotations

import torch

from .base import SelectionContext, clamp_budget, fused_layer_attention
from .kvfuse_staged import START_SHARE, START_TOKENS, _pick, chunk_budgets, chunk_starts

PROBE_SHARE = 1.0   # layers the probe's relevance is fused over (from layer 0), as a share of all layers

__all__ = ["PROBE_SHARE", "START_SHARE", "START_TOKENS", "chunk_budgets", "chunk_starts", "relevance", "select"]


def relevance(ctx: SelectionContext, share: float = PROBE_SHARE) -> torch.Tensor:
    """[C] the question's attention fused over the first `share` of the layers (one plain probe)."""
    depth = max(1, round(share * ctx.kv.shape[0]))
    return ctx.memo(("kvfuse", depth), lambda: fused_layer_attention(ctx.question_attention(), slice(0, depth)))


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    lay = ctx.layout
    budget = clamp_budget(budget, lay.context_len)
    chosen = chunk_starts(ctx, budget)
    rel = relevance(ctx)
    scores = rel.clone()
    scores[chosen - lay.prefix_len] = float("-inf")
    return torch.cat((chosen, _pick(ctx, scores, rel, budget - chosen.numel()))).sort().values


select.probe_share = PROBE_SHARE   # a request running kvfuse alone probes only this share of the layers
