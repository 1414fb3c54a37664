"""An attention function that can also record attention probabilities.

kvfuse registers "kvfuse" with transformers' AttentionInterface: it computes the
output with SDPA exactly as "sdpa" does, and, only while an `AttentionRecorder`
is active, also records softmax(q k^T) averaged over heads for the layers asked
for. Selectors use it to measure question-to-context attention; the build uses
it for the saliency prior. Nothing is recorded (and nothing is paid) otherwise.

Inside `recompute_attention.scattered_queries(...)` (the recompute pass) the same
function attends the pass's scattered queries with the block-sparse kernels of
`recompute_attention` and the mask function builds no dense mask.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import recompute_attention

IMPLEMENTATION = "kvfuse"


class AttentionRecorder:
    """Collects, per layer, attention probabilities [Q, K] (mean over heads) of the queries
    in `query_rows` (a slice over the current input; default all); batched: [B, Q, K], one
    map per sequence of a batched forward."""

    def __init__(self, layers: set[int] | None = None, query_rows: slice = slice(None), batched: bool = False):
        self.layers = layers
        self.query_rows = query_rows
        self.batched = batched
        self.maps: dict[int, torch.Tensor] = {}

    def wants(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers


_local = threading.local()   # per thread: an engine may run passes on several threads


def active_recorder() -> AttentionRecorder | None:
    return getattr(_local, "recorder", None)


@contextmanager
def record_attention(recorder: AttentionRecorder):
    previous, _local.recorder = active_recorder(), recorder
    try:
        yield recorder
    finally:
        _local.recorder = previous


def _probabilities(query, key, attention_mask, scaling, rows: slice = slice(None)) -> torch.Tensor:
    # query [B, Hq, q, D]; key [B, Hkv, K, D] -> probs [B, r, K] of the query rows `rows`, mean over heads.
    # Only the recorded rows are scored: a probe of S recomputed + Q question tokens records the
    # Q rows, and scoring all S + Q would cost S/Q times more memory and time.
    # Grouped-query heads are scored against their shared KV head without repeat_kv, which would
    # materialise Hq/Hkv copies of the keys (at 16k tokens on Llama-3-8B: ~270 MB per layer in fp32).
    q_all, k = query.shape[2], key.shape[2]
    row_pos = torch.arange(q_all, device=query.device)[rows]            # [r] row index in the input
    query = query[:, :, rows]
    b, n_q_heads, r, d = query.shape
    n_kv_heads = key.shape[1]
    grouped = query.float().reshape(b, n_kv_heads, n_q_heads // n_kv_heads * r, d)  # head h uses KV head h // G
    scores = (grouped @ key.float().transpose(-1, -2)).reshape(b, n_q_heads, r, k) * scaling  # [B, Hq, r, K]
    if attention_mask is None:  # plain causal, the input being the last q_all positions
        allowed = torch.arange(k, device=scores.device)[None, :] <= (row_pos + (k - q_all))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        mask = attention_mask[..., :k]
        if mask.shape[-2] == q_all:
            mask = mask[..., rows, :]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    return scores.softmax(-1).mean(1)  # [B, r, K]


def kvfuse_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    scattered = recompute_attention.current()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if scattered is not None and query.shape[2] == scattered.rows:
        out = (scattered.attend(module, query, key, value, scale), None)
    else:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
        scattered = None
    rec = active_recorder()
    if rec is not None and rec.wants(module.layer_idx):
        if scattered is not None:
            attention_mask = scattered.row_mask(rec.query_rows)  # [1, 1, r, K]: only the recorded rows
        probs = _probabilities(query, key, attention_mask, scale, rec.query_rows)  # [B, r, K]
        rec.maps[module.layer_idx] = probs if rec.batched else probs[0]
    return out


def kvfuse_mask(*args, **kwargs):
    """SDPA's mask, except in a scattered recompute pass, whose attention needs none."""
    if recompute_attention.current() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, kvfuse_attention)
AttentionMaskInterface.register(IMPLEMENTATION, kvfuse_mask)


def use_kvfuse_attention(model) -> None:
    """Switch a loaded model to the recording-capable SDPA attention."""
    model.set_attn_implementation(IMPLEMENTATION)
