"""`kvfuse` (ours): question relevance, refined in stages, x the offline saliency
prior, with a per-chunk budget by chunk relevance and short spans.

0. Chunk starts: the first START_TOKENS tokens of every chunk (at most
   START_SHARE of the budget) are taken up front: prefilled right after the
   prefix, a chunk's first tokens differ most from their in-context selves
   (EPIC's observation), whatever the question.

Each of STAGES stages then spends an equal share of the rest:

1. Relevance: the question's attention to every context token, measured by a
   pass of the question over the fused cache in which the tokens chosen so far
   are already recomputed; per layer normalised to sum 1 over the context and
   averaged over layers (so no band of layers dominates). Stage 1 is the shared
   probe over the plain reused cache. Repairing the most relevant tokens first
   moves the question's attention; the next stage follows it. (ProphetKV uses
   two stages; measured on a dev split, three recover more: docs/selectors.md.)
2. Prior: the stored saliency rows (`attn_received`, and `kv_deviation` where
   the build filled it), scaled to mean 1 per chunk, enter as prior**PRIOR_EXP.
3. Chunk budget: a stage's share is split over chunks in proportion to the
   chunk's summed relevance (capped at its free tokens), then the best tokens
   of each chunk are taken.
4. Spans: a token's score is raised by the best score within SPAN // 2 tokens
   of it, so the picks grow into short spans (a number, a name) rather than
   isolated subwords.

Cost: STAGES question passes (over the chunk starts, then each stage's picks)
before the recompute itself; the prior is free at serve time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SelectionContext, clamp_budget, empty, fused_layer_attention, top_positions

STAGES = 3
START_TOKENS = 4    # first tokens of every chunk recomputed up front (EPIC's sink repair) ...
START_SHARE = 0.25  # ... using at most this share of the budget
PRIOR_EXP = 0.0     # the measured effect of the prior on the dev split was negative: off (docs/selectors.md)
CHUNK_BUDGET = True
SPAN = 1


def prior(ctx: SelectionContext) -> torch.Tensor:
    """[C] the stored saliency rows, each scaled to mean 1 per chunk, averaged (ones when absent)."""
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
    budget = min(budget, int(lens_t.sum()))
    quota = torch.zeros(len(lens), dtype=torch.float64)
    left, open_ = float(budget), lens_t > 0
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


def _stage_scores(ctx: SelectionContext, relevance: torch.Tensor) -> torch.Tensor:
    s = relevance.clone()
    if PRIOR_EXP:
        s = s * ctx.memo(("kvfuse-prior",), lambda: prior(ctx)).clamp_min(1e-3) ** PRIOR_EXP
    if SPAN > 1:
        s = s + F.max_pool1d(s[None, None], SPAN + 1 - SPAN % 2, stride=1, padding=SPAN // 2)[0, 0]
    return s


def _pick(ctx: SelectionContext, scores: torch.Tensor, relevance: torch.Tensor, take: int) -> torch.Tensor:
    lay = ctx.layout
    if not CHUNK_BUDGET:
        return top_positions(scores, take, lay)
    starts = [s - lay.prefix_len for s in lay.chunk_starts]
    owner = lay.chunk_index().to(relevance.device)                                   # [C] chunk of each token
    chunk_rel = torch.zeros(len(starts), dtype=relevance.dtype, device=relevance.device).index_add_(0, owner, relevance)
    free = torch.zeros(len(starts), device=scores.device).index_add_(0, owner, torch.isfinite(scores).float())
    quotas = chunk_budgets(chunk_rel.cpu(), free.long().tolist(), take)          # one host sync, not 2 per chunk
    return torch.cat([top_positions(scores[a:a + n], q, lay) + a for a, n, q in zip(starts, lay.chunk_lens, quotas)])


def chunk_starts(ctx: SelectionContext, budget: int) -> torch.Tensor:
    """The first k tokens of every chunk, k <= START_TOKENS and within START_SHARE of the budget."""
    lay = ctx.layout
    k = min(START_TOKENS, int(budget * START_SHARE) // max(1, len(lay.chunk_lens)))
    if k <= 0:
        return empty()
    return torch.cat([torch.arange(s, s + min(k, n)) for s, n in zip(lay.chunk_starts, lay.chunk_lens)])


def _staged(ctx: SelectionContext, budget: int, probes: str) -> torch.Tensor:
    """probes: "joint" (each stage's probe recomputes every pick so far with the question),
    "incremental" (only the new picks, over the working cache where the earlier probes left
    theirs; the final recompute runs every pick again, jointly) or "kept" (the same, and the
    probes' picks stay as they are: the final recompute runs only the last stage's picks)."""
    lay = ctx.layout
    budget = clamp_budget(budget, lay.context_len)
    if probes == "kept" and budget >= lay.context_len:   # everything: one joint recompute, the full prefill
        return torch.arange(lay.prefix_len, lay.question_start)
    chosen = chunk_starts(ctx, budget)
    pending = chosen                      # chosen but not yet in the working cache (incremental probes)
    first, rest = chosen.numel(), budget - chosen.numel()
    repairing = False
    for stage in range(STAGES):
        take = first + round(rest * (stage + 1) / STAGES) - chosen.numel()
        if take <= 0:
            continue
        if probes == "joint":
            relevance = fused_layer_attention(ctx.question_attention(chosen))  # a pass of every pick so far + Q
        elif pending.numel() or repairing:                 # a pass of the new picks + Q, fused where it ran
            relevance = ctx.repair(pending, keep=probes == "kept", reduce=fused_layer_attention)
            repairing = True
        else:                                              # nothing to repair yet: the shared plain probe
            relevance = fused_layer_attention(ctx.question_attention())
        scores = _stage_scores(ctx, relevance)
        scores[chosen - lay.prefix_len] = float("-inf")
        pending = _pick(ctx, scores, relevance, take)
        chosen = torch.cat((chosen, pending)).sort().values
    return chosen


def select(ctx: SelectionContext, budget: int) -> torch.Tensor:
    """The default. Incremental probes: each stage's probe runs only its new picks (and the
    question) over the run's working cache, in which the earlier probes left their picks'
    fresh K/V; the final recompute then runs every pick jointly. The selections are those
    of joint probes (`select_joint_probes`) on 30 of 40 dev examples and their first-token
    KL within 0.003 on average (docs/selectors.md), at about 60% of their probe tokens."""
    return _staged(ctx, budget, "incremental")


def select_joint_probes(ctx: SelectionContext, budget: int) -> torch.Tensor:
    """Each stage's probe recomputes every pick so far with the question (the rule as first
    shipped): about 2 x budget tokens of probes before the recompute."""
    return _staged(ctx, budget, "joint")


def select_incremental(ctx: SelectionContext, budget: int) -> torch.Tensor:
    """Incremental probes whose picks stay as the probes left them: the final recompute runs
    only the last stage's picks with the question, so the tokens through the model are the
    budget plus STAGES + 1 passes of the question, about one recompute in all. An earlier
    pick's K/V does not see the later picks' repairs (it saw their stored K/V): on the dev
    examples that costs +0.02 to +0.03 nats of first-token KL (docs/selectors.md)."""
    return _staged(ctx, budget, "kept")
