"""`prophet` (ProphetKV): question-to-context attention fused over layers, in two stages.

Stage 1: the question is run over the reused cache; its attention to every
context token is summed over question tokens, normalised per layer and averaged
over all layers (so the many late layers do not drown the early ones, nor the
reverse); the top half of the budget is taken. Stage 2: those tokens are
recomputed together with the question, the question's attention is measured
again on the partly repaired cache, fused the same way, and the rest of the
budget goes to the best tokens not yet chosen. Ranking by the question alone
avoids the "crowding-out" of question-irrelevant salient tokens the paper
describes. Cost: two probe passes (Q, then budget/2 + Q tokens).
"""

import torch

from .base import SelectionContext, fused_layer_attention, top_positions

FIRST_STAGE = 0.5


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    lay = ctx.layout
    first = ctx.memo(("prophet", 1), lambda: fused_layer_attention(ctx.question_attention()))  # [C]
    stage1 = top_positions(first, int(budget * FIRST_STAGE), lay)
    second = fused_layer_attention(ctx.question_attention(stage1)).clone()                     # [C]
    second[stage1 - lay.prefix_len] = float("-inf")
    stage2 = top_positions(second, budget - stage1.numel(), lay)
    return torch.cat((stage1, stage2)).sort().values
