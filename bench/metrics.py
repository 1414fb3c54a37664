"""Answer-level metrics against the full prefill (docs/eval.md).

    lp = answer_logprobs(lm, [cache], [first_logits], next_pos, answer_ids)   # [B, T, V] log-probs
    kl = kl_per_position(full_lp, method_lp)                                # [T] nats
    lo, hi = bootstrap_ci(differences)                                      # paired 95% interval

The answer KL is teacher-forced: every method is fed the full prefill's own greedy
answer, so position t compares the two next-token distributions after the same
t answer tokens. A divergence at the entity (after a first token both agree on)
shows up here, not in the first-token KL.
"""

from __future__ import annotations

import torch

from kvfuse.runtime.kvcache import ScatterLayer
from kvfuse.runtime.model import cache_kwargs


def kl_per_position(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per position: [..., V] log-probs -> [...] nats (>= 0, float32)."""
    ref, other = ref_logprobs.float(), logprobs.float()
    return (ref.exp() * (ref - other)).sum(-1).clamp_min(0)


@torch.inference_mode()
def answer_logprobs(lm, caches: list, first_logits: list[torch.Tensor], next_pos: int,
                    answer_ids: list[int]) -> torch.Tensor:
    """Log-probs [B, T, V] (float32, on the CPU) of each prefilled cache teacher-forced along
    `answer_ids` (T tokens): row t is the distribution of answer token t given tokens < t.

    caches: B transformers caches of one length `next_pos` (they are copied, not extended),
    first_logits: B tensors [V], the logits each prefill produced for answer token 0.
    """
    from transformers.cache_utils import DynamicCache

    first = torch.stack([l.float().cpu() for l in first_logits]).log_softmax(-1)[:, None]  # [B, 1, V]
    if len(answer_ids) <= 1:
        return first[:, :len(answer_ids)]
    device = lm.model.device
    cache = DynamicCache()
    cache.layers = [ScatterLayer(torch.cat([c.layers[l].keys for c in caches]),          # [B, H_kv, N, D]
                                 torch.cat([c.layers[l].values for c in caches]))
                    for l in range(len(caches[0].layers))]
    B, T = len(caches), len(answer_ids)
    ids = torch.tensor(answer_ids[:-1], device=device)[None].expand(B, -1)                # [B, T-1]
    pos = torch.arange(next_pos, next_pos + T - 1, device=device)[None].expand(B, -1)
    out = lm.model(input_ids=ids, position_ids=pos, **cache_kwargs(lm.model, cache), use_cache=True)
    rest = out.logits.float().log_softmax(-1).cpu()                                       # [B, T-1, V]
    return torch.cat((first, rest), dim=1)


def answer_kls(lm, pending: list, next_pos: int, answer_ids: list[int], group: int = 4) -> list[torch.Tensor]:
    """Per cache in `pending` ((cache, first logits), the full prefill first), the KL [T] of
    each answer position against the full prefill's, teacher-forced along `answer_ids`.
    Caches go `group` at a time: [B, T, V] log-probs of a 150k vocabulary are large."""
    ref, kls = None, []
    for g in range(0, len(pending), group):
        part = pending[g:g + group]
        lp = answer_logprobs(lm, [c for c, _ in part], [l for _, l in part], next_pos, answer_ids)  # [B, T, V]
        ref = lp[0] if ref is None else ref
        kls.extend(kl_per_position(ref, lp))
    return kls


def answer_agreement(a: list[int] | str, b: list[int] | str) -> float:
    """1.0 when two greedy answers are identical (token ids, or text up to whitespace), else 0.0."""
    if isinstance(a, str) and isinstance(b, str):
        return float(" ".join(a.split()) == " ".join(b.split()))
    return float(list(a) == list(b))


def bootstrap_ci(diffs: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired per-example differences.

    Resamples examples with replacement (seeded, so a report is reproducible). A constant
    difference gives (c, c); fewer than 2 differences give (nan, nan)."""
    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    d = torch.tensor(diffs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(n, (resamples, n), generator=g)].mean(1)                     # [resamples]
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)
