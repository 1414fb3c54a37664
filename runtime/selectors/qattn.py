"""`qattn`: question-to-context attention averaged over all layers and question tokens (one stage).

The simplest query-driven rule, kept as a baseline: prophet without its second stage.
"""

import torch

from .base import SelectionContext, top_positions


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    s = ctx.memo(("qattn",), lambda: ctx.question_attention().mean(dim=(0, 1)))  # [C]
    return top_positions(s, budget, ctx.layout)
