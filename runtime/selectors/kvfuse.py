"""`kvfuse` (ours): question relevance x the offline saliency prior, a per-chunk
budget by chunk relevance, tokens grouped into short spans.

1. Relevance: the question's attention to every context token from one pass of
   the question over the reused cache, normalised per layer and averaged over
   layers (as prophet's first stage).
2. Prior: the stored saliency rows (`attn_received`, and `kv_deviation` where
   the build filled it), each scaled to mean 1 within its chunk; the token
   score is relevance x (PRIOR_FLOOR + prior). A token the chunk's own tokens
   lean on (a local sink, a name, a number) and the question looks at is the one
   whose stale K/V hurts most.
3. Chunk budget: each chunk gets a share of the budget proportional to its
   summed relevance (largest remainder, capped at its length), so the budget
   concentrates on the chunks the question reads instead of spreading thin.
4. Spans: inside a chunk, tokens are grouped into spans of SPAN consecutive
   tokens and whole spans are taken by summed score; recomputing a phrase
   together repairs its tokens' mutual attention, which isolated picks miss.

Cost: one probe pass of the question (shared with a3/prophet/qattn); the prior
is read from the store, free at serve time.
"""

from __future__ import annotations

import torch

from .base import SelectionContext, clamp_budget, empty, fused_layer_attention

SPAN = 8
PRIOR_FLOOR = 0.5


def prior(ctx: SelectionContext) -> torch.Tensor:
    """[C] the stored saliency rows, each scaled to mean 1 per chunk, summed (ones when absent)."""
    lay = ctx.layout
    if ctx.saliency is None:
        return torch.ones(lay.context_len)
    sal = ctx.saliency.float().clamp_min(0)                      # [S, C]
    out = torch.zeros(lay.context_len)
    used = 0
    for row in sal:
        if not row.any():                                        # e.g. kv_deviation of an isolated build
            continue
        used += 1
        for s, n in zip(lay.chunk_starts, lay.chunk_lens):
            a = s - lay.prefix_len
            seg = row[a:a + n]
            out[a:a + n] += seg / seg.mean().clamp_min(1e-12)
    return out / used if used else torch.ones(lay.context_len)


def chunk_budgets(relevance: torch.Tensor, lens: list[int], budget: int) -> list[int]:
    """Split `budget` over chunks in proportion to `relevance` [K], capped at each chunk's length."""
    lens_t = torch.tensor(lens, dtype=torch.float64)
    rel = relevance.double().clamp_min(1e-12)
    quota = torch.zeros(len(lens), dtype=torch.float64)
    left, open_ = float(budget), torch.ones(len(lens), dtype=torch.bool)
    while left > 1e-9 and open_.any():                            # water-filling with caps
        share = rel * open_ / (rel * open_).sum() * left
        quota = torch.minimum(quota + share, lens_t)
        left = budget - float(quota.sum())
        open_ = quota < lens_t
    ints = quota.floor().long()
    rest = budget - int(ints.sum())
    frac = (quota - ints).masked_fill(ints >= lens_t.long(), -1.0)
    for j in torch.sort(frac, descending=True, stable=True).indices[:max(rest, 0)]:
        ints[j] += 1
    return ints.tolist()


def pick_spans(scores: torch.Tensor, quota: int, span: int = SPAN) -> torch.Tensor:
    """Indices (within one chunk, [T] scores) of the best whole spans, `quota` tokens in all."""
    if quota <= 0:
        return empty()
    n = scores.numel()
    starts = torch.arange(0, n, span)
    sums = torch.stack([scores[s:s + span].sum() for s in starts])
    out, left = [], quota
    for j in torch.sort(sums, descending=True, stable=True).indices.tolist():
        s = int(starts[j])
        idx = torch.arange(s, min(s + span, n))
        if idx.numel() > left:  # last span: its best tokens
            idx = idx[torch.sort(scores[idx], descending=True, stable=True).indices[:left]]
        out.append(idx)
        left -= idx.numel()
        if left == 0:
            break
    return torch.cat(out)


def token_scores(ctx: SelectionContext) -> torch.Tensor:
    relevance = fused_layer_attention(ctx.question_attention())   # [C]
    return relevance * (PRIOR_FLOOR + prior(ctx))                  # [C]


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    lay = ctx.layout
    budget = clamp_budget(budget, lay.context_len)
    if budget == 0:
        return empty()
    scores = ctx.memo(("kvfuse", SPAN, PRIOR_FLOOR), lambda: token_scores(ctx))
    relevance = ctx.memo(("kvfuse-rel",), lambda: fused_layer_attention(ctx.question_attention()))
    starts = [s - lay.prefix_len for s in lay.chunk_starts]
    chunk_rel = torch.stack([relevance[a:a + n].sum() for a, n in zip(starts, lay.chunk_lens)])
    picks = [pick_spans(scores[a:a + n], q) + a + lay.prefix_len
             for a, n, q in zip(starts, lay.chunk_lens, chunk_budgets(chunk_rel, list(lay.chunk_lens), budget))]
    return torch.cat(picks).sort().values
