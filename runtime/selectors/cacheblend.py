"""`cacheblend` (CacheBlend): the tokens whose K/V deviate most at layer 1.

Online, every context token is recomputed at the first layers (layers 0..1
with the full context) and its fresh K/V compared with the stored ones; the
tokens with the largest deviation ||K' - K||^2 + ||V' - V||^2 (summed over
heads and channels) are recomputed at every layer. Layer 0 sees only token
embeddings, so its K/V never deviate (re-rotation is exact): layer 1 is the
first informative one. CacheBlend narrows the set further layer by layer; here
the set chosen at layer 1 is kept for all layers (one recompute pass).
Cost: two layers of a full prefill over the context (~2/L of its FLOPs).
"""

import torch

from .base import SelectionContext, top_positions

LAYER = 1


def deviation(ctx: SelectionContext, layer: int = LAYER) -> torch.Tensor:
    """[C] squared K/V deviation between stored and recomputed at `layer`."""
    lay = ctx.layout
    layer = min(layer, ctx.kv.shape[0] - 1)
    fresh = ctx.layer_kv(layer).float()                                   # [2, H_kv, C, D]
    stored = ctx.kv[layer, :, :, lay.prefix_len:lay.question_start].float()  # [2, H_kv, C, D]
    return (fresh - stored).pow(2).sum(dim=(0, 1, 3))


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    scores = ctx.memo(("cacheblend", LAYER), lambda: deviation(ctx))
    return top_positions(scores, budget, ctx.layout)
