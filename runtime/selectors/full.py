"""`full`: recompute every context token (the reference: equals a full prefill)."""

import torch

from .base import SelectionContext


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    return ctx.layout.context_positions()
