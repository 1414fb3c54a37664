"""`a3` (A³): question-to-context attention at one early layer, pooled over a small window.

The question is run over the reused cache once (the probe); its attention to
each context token at `LAYER`, summed over question tokens, is max-pooled over
`WINDOW` neighbours (so a relevant token pulls in its neighbours) and the top
tokens are recomputed. Cost: one pass of the Q question tokens (shared with
every other question-attention selector).
"""

import torch
import torch.nn.functional as F

from .base import SelectionContext, top_positions

LAYER = 1
WINDOW = 5


def scores(ctx: SelectionContext, layer: int = LAYER, window: int = WINDOW) -> torch.Tensor:
    attn = ctx.question_attention()                       # [L, Q, C]
    s = attn[min(layer, attn.shape[0] - 1)].sum(0)        # [C]
    return F.max_pool1d(s[None, None], window, stride=1, padding=window // 2)[0, 0]


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    s = ctx.memo(("a3", LAYER, WINDOW), lambda: scores(ctx))
    return top_positions(s, budget, ctx.layout)
