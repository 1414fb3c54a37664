"""`kvfuse-gradual`: a larger set at the first layers, narrowed inside the recompute (CacheBlend's
gradual filtering, ranked by the question as kvfuse ranks). Measured, not the default: on the
dev runs it was no better than the same S_0 kept flat, and below `kvfuse` (docs/selectors.md).

S_0 (the recompute's set at layer 0) is the chunk starts plus the tokens the question attends
to most in a cheap probe; at the layers where `LEVELS` steps down the driver keeps the tokens
of the current set the question attended to most in the layers just run, measured inside the
recompute pass itself (`fusion.LayerNarrowing`: the question's rows of the attention scores,
no extra pass). Per-layer counts are at equal FLOPs: their mean is the budget
(`base.layer_schedule`), so the recompute costs what a fixed set of `budget` tokens costs.

Probes (`PROBE`): "a3" — the question through layers 0..1 only (a3's probe, A³'s layer-1 rule
max-pooled over 5 neighbours); "fused" — the question through all layers, relevance fused
over layers (prophet's stage 1). The selection cost is that one probe.
"""

from __future__ import annotations

import torch

from . import a3
from .base import LayerPlan, SelectionContext, clamp_budget, fused_layer_attention, layer_schedule, top_positions
from .kvfuse_staged import chunk_starts

LEVELS = ((0.0, 2.0), (1 / 3, 0.75), (2 / 3, 0.25))   # (first layer / L, tokens / budget): mean = 1 budget
PROBE = "a3"
PIN_STARTS = True       # chunk starts are kept at every layer


def probe_scores(ctx: SelectionContext, probe: str) -> torch.Tensor:
    """[C] the probe's relevance of every context token."""
    if probe == "a3":
        return ctx.memo(("a3", a3.LAYER, a3.WINDOW), lambda: a3.scores(ctx))
    return ctx.memo(("prophet", 1), lambda: fused_layer_attention(ctx.question_attention()))


def plan(ctx: SelectionContext, budget: int, levels=LEVELS, probe: str = PROBE, pin_starts: bool = PIN_STARTS,
         window: int | None = None) -> LayerPlan:
    lay = ctx.layout
    budget = clamp_budget(budget, lay.context_len)
    keep = layer_schedule(list(levels), ctx.kv.shape[0], budget, lay.context_len)
    starts = chunk_starts(ctx, budget)                                      # always in S_0
    scores = probe_scores(ctx, probe).clone()                               # [C]
    scores[starts - lay.prefix_len] = float("inf")
    initial = top_positions(scores, keep[0], lay)
    pinned = starts if pin_starts and starts.numel() <= keep[-1] else None
    return LayerPlan(initial=initial, keep=keep, pinned=pinned, window=window)


def select(ctx: SelectionContext, budget: int) -> LayerPlan:
    return plan(ctx, budget)


select.probe_layers = a3.LAYER + 1 if PROBE == "a3" else None
select.on_device = PROBE == "a3"   # scores, picks and the in-pass narrowing all stay on the GPU: no host sync


def select_full_probe(ctx: SelectionContext, budget: int) -> LayerPlan:
    """`kvfuse-gradual-full`: S_0 from the all-layer probe (kvfuse's), narrowed the same way."""
    return plan(ctx, budget, probe="fused")
