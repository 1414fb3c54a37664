"""Dev variants of the staged rule, scored on the whole answer (docs/selectors.md, 2026-11-30):
    python bench/selector_dev.py RUN_DIR kvfuse,v-last1 --variants bench/dev/answer_variants.py --answers
"""
import torch
import torch.nn.functional as F
from kvfuse.runtime.selectors import SELECTORS
from kvfuse.runtime.selectors import kvfuse_staged as ks
from kvfuse.runtime.selectors.base import clamp_budget, fused_layer_attention, top_positions

def rel_weighted(attn, last=0, mix=0.0, layers=slice(None)):
    """attn [L, Q, C]. last>0: also the attention of the last `last` question tokens, mixed in with weight mix."""
    a = fused_layer_attention(attn, layers)
    if last and mix:
        b = fused_layer_attention(attn[:, -last:], layers)
        a = (1 - mix) * a + mix * b
    return a

def staged(rel_fn=rel_weighted, chunk_pow=1.0, fwd=0, last_stage_fwd_only=True, prior_exp=0.0, decay=0.0, decay_all=False, init=None):
    def select(ctx, budget):
        lay = ctx.layout
        budget = clamp_budget(budget, lay.context_len)
        chosen = ks.chunk_starts(ctx, budget)
        if init is not None:
            chosen = torch.cat((chosen, init(ctx, budget))).unique()
        pending = chosen
        first, rest = chosen.numel(), budget - chosen.numel()
        repairing = False
        for stage in range(ks.STAGES):
            take = first + round(rest * (stage + 1) / ks.STAGES) - chosen.numel()
            if take <= 0:
                continue
            if pending.numel() or repairing:
                attn = ctx.repair(pending, keep=False); repairing = True
            else:
                attn = ctx.question_attention()
            relevance = rel_fn(attn)
            scores = relevance.clone()
            if prior_exp:
                scores = scores * ctx.memo(('kvfuse-prior',), lambda: ks.prior(ctx)).clamp_min(1e-3) ** prior_exp
            if fwd and (stage == ks.STAGES - 1 or not last_stage_fwd_only):
                # a token also scores what the best of the `fwd` tokens before it scores (answers follow their cue)
                pad = F.pad(scores[None, None], (fwd, 0), value=0.0)
                scores = torch.maximum(scores, F.max_pool1d(pad, fwd + 1, stride=1)[0, 0] * 0.999)
            if decay and (stage == ks.STAGES - 1 or decay_all):
                # a token scores at least decay x its left neighbour's score, within a chunk (the answer follows its cue)
                s2 = scores.clone()
                for a, n in zip([s - lay.prefix_len for s in lay.chunk_starts], lay.chunk_lens):
                    for t in range(a + 1, a + n):
                        s2[t] = max(s2[t], decay * s2[t - 1])
                scores = s2
            scores[chosen - lay.prefix_len] = float("-inf")
            r = relevance ** chunk_pow if chunk_pow != 1.0 else relevance
            pending = ks._pick(ctx, scores, r, take)
            chosen = torch.cat((chosen, pending)).sort().values
        return chosen
    select.reads_stored = False
    return select

SELECTORS["v-base"] = staged()
SELECTORS["v-last4"] = staged(lambda a: rel_weighted(a, 4, 0.5))
SELECTORS["v-last1"] = staged(lambda a: rel_weighted(a, 1, 0.5))
SELECTORS["v-last1only"] = staged(lambda a: rel_weighted(a, 1, 1.0))
SELECTORS["v-cpow2"] = staged(chunk_pow=2.0)
SELECTORS["v-fwd4"] = staged(fwd=4)
SELECTORS["v-fwd8all"] = staged(fwd=8, last_stage_fwd_only=False)
SELECTORS["v-prior05"] = staged(prior_exp=0.5)
SELECTORS["v-prior1"] = staged(prior_exp=1.0)
SELECTORS["v-dec5"] = staged(decay=0.5)
SELECTORS["v-dec5all"] = staged(decay=0.5, decay_all=True)
SELECTORS["v-dec3all"] = staged(decay=0.3, decay_all=True)
SELECTORS["v-last1-dec5"] = staged(lambda a: rel_weighted(a, 1, 0.5), decay=0.5, decay_all=True)
SELECTORS["v-cpow4"] = staged(chunk_pow=4.0)
SELECTORS["v-cpow8"] = staged(chunk_pow=8.0)


def top_window(share):
    """The most relevant chunk's (plain probe) most relevant contiguous window of share x budget tokens."""
    def init(ctx, budget):
        lay = ctx.layout
        rel = fused_layer_attention(ctx.question_attention())
        owner = lay.chunk_index()
        chunk_rel = torch.zeros(len(lay.chunk_lens)).index_add_(0, owner, rel)
        k = int(chunk_rel.argmax())
        s, n = lay.chunk_starts[k], lay.chunk_lens[k]
        take = min(n, int(budget * share))
        if take <= 0:
            return torch.zeros(0, dtype=torch.long)
        seg = rel[s - lay.prefix_len: s - lay.prefix_len + n]
        a = int(seg.unfold(0, take, 1).sum(1).argmax()) if take < n else 0
        return torch.arange(s + a, s + a + take)
    return init

SELECTORS["v-win25"] = staged(init=top_window(0.25))
SELECTORS["v-win50"] = staged(init=top_window(0.5))
