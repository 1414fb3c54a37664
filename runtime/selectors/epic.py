"""`epic` (EPIC / LegoLink): the first k tokens of every chunk.

Each chunk was prefilled on its own, so its first tokens acted as a private
attention sink; recomputing them in context repairs that. k is the largest
count such that the first k tokens of every chunk fit the budget; what is left
goes, one token each, to the (k+1)-th tokens of the earliest chunks still
longer than k. Needs no model pass: free to select.
"""

import torch

from .base import SelectionContext, clamp_budget, empty


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    lay = ctx.layout
    lens = torch.tensor(lay.chunk_lens, dtype=torch.long)             # [K]
    budget = clamp_budget(budget, int(lens.sum()))
    if budget == 0:
        return empty()
    k = 0
    while k < int(lens.max()) and int(lens.clamp(max=k + 1).sum()) <= budget:
        k += 1
    quota = lens.clamp(max=k)                                          # [K]
    left = budget - int(quota.sum())
    for j in range(len(lens)):
        if left == 0:
            break
        if lens[j] > quota[j]:
            quota[j] += 1
            left -= 1
    picks = [torch.arange(s, s + int(q)) for s, q in zip(lay.chunk_starts, quota)]
    return torch.cat(picks)
