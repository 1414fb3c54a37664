"""`reuse`: recompute nothing (plain concatenation of the stored chunk KV; the question is still computed)."""

import torch

from .base import SelectionContext, empty


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    return empty()
