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
import warnings
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import recompute_attention, shape_buckets

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


_float_scores_only: str | None = None   # why this torch/GPU can't write float32 scores from bf16 inputs


def _scores(grouped: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """grouped [B, H_kv, n, D] @ key [B, H_kv, K, D]^T -> [B, H_kv, n, K] float32.

    Half-precision inputs on CUDA go through one GEMM that accumulates in float32 and writes
    float32 (`torch.bmm(..., out_dtype=)`): the products of bf16 numbers are exact in float32,
    so the scores are those of upcasting first, without the float32 copies of the keys or a
    float32 GEMM (on the H200 the recorder's upcast GEMM took 12 of a fused pass's 305 ms)."""
    global _float_scores_only
    b, h, n, d = grouped.shape
    if n == 0:                                            # no recorded rows
        return grouped.new_zeros((b, h, 0, key.shape[2]), dtype=torch.float32)
    if grouped.is_cuda and grouped.dtype in (torch.bfloat16, torch.float16) and _float_scores_only is None:
        try:
            out = torch.bmm(grouped.reshape(b * h, n, d), key.reshape(b * h, -1, d).transpose(1, 2),
                            out_dtype=torch.float32)
            return out.view(b, h, n, -1)
        except torch.OutOfMemoryError:
            raise                                          # not a missing kernel: say so, don't switch paths
        except (RuntimeError, TypeError) as exc:           # a torch without bmm(out_dtype=) on this GPU
            _float_scores_only = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"the attention recorder scores in float32 from now on ({_float_scores_only[:200]})",
                          stacklevel=2)
    return grouped.float() @ key.float().transpose(-1, -2)


def _probabilities(query, key, attention_mask, scaling, rows: slice = slice(None), mask_from: int = 0,
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
    # query [B, Hq, q, D]; key [B, Hkv, K, D] -> probs [B, r, K] of the query rows `rows`, mean over heads.
    # Only the recorded rows are scored: a probe of S recomputed + Q question tokens records the
    # Q rows, and scoring all S + Q would cost S/Q times more memory and time.
    # Grouped-query heads are scored against their shared KV head without repeat_kv, which would
    # materialise Hq/Hkv copies of the keys (at 16k tokens on Llama-3-8B: ~270 MB per layer in fp32).
    # mask_from: every recorded row sees every key before this column, so only the columns from it
    # on are masked (attention_mask: those columns only, [..., r, K - mask_from]; or `hidden`, its
    # negation, [1, 1, r, K - mask_from] bool, True where a row can't see the key).
    q_all, k = query.shape[2], key.shape[2]
    query = query[:, :, rows]
    b, n_q_heads, r, d = query.shape
    n_kv_heads = key.shape[1]
    grouped = query.reshape(b, n_kv_heads, n_q_heads // n_kv_heads * r, d)  # head h uses KV head h // G
    scores = _scores(grouped, key).view(b, n_q_heads, r, k)                  # [B, Hq, r, K] float32
    scores.mul_(scaling)
    tail = scores[..., mask_from:]
    if hidden is None and attention_mask is None:  # plain causal, the input being the last q_all positions
        row_pos = torch.arange(q_all, device=query.device)[rows]        # [r] row index in the input
        hidden = torch.arange(mask_from, k, device=scores.device)[None, :] > (row_pos + (k - q_all))[:, None]
    if hidden is not None:
        tail.masked_fill_(hidden, float("-inf"))
    else:
        mask = attention_mask[..., :k - mask_from]
        if mask.shape[-2] == q_all:
            mask = mask[..., rows, :]
        if mask.dtype == torch.bool:
            tail.masked_fill_(~mask, float("-inf"))
        else:
            tail.add_(mask.float())
    return scores.softmax(-1).mean(1)  # [B, r, K]


def kvfuse_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    scattered = recompute_attention.current()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if scattered is not None and query.shape[2] == scattered.rows:
        out = (scattered.attend(module, query, key, value, scale), None)
    elif (attention_mask is not None and attention_mask.dim() == 4 and query.shape[2] > 1 and dropout == 0.0
          and not query.requires_grad and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
          and shape_buckets.enabled(query)):
        # a masked call (a question probe): at padded shapes, so cuDNN plans it once per bucket
        mask = attention_mask[..., :key.shape[2]]
        out = (shape_buckets.bucketed_sdpa(query, key, value, mask, scale).transpose(1, 2).contiguous(), None)
        scattered = None
    else:
        with shape_buckets.decode_kernels(query):   # a decode step: no kernel that plans per key length
            out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                         **kwargs)
        scattered = None
    rec = active_recorder()
    if rec is not None and rec.wants(module.layer_idx):
        mask_from, hidden = 0, None
        if scattered is not None:   # [1, 1, r, K - mask_from]: only the recorded rows, from the first key one can't see
            mask_from, hidden = scattered.recorded(rec.query_rows)
        elif attention_mask is None:   # plain causal: row i of the last q_all sees keys <= K - q_all + i
            recorded = range(query.shape[2])[rec.query_rows]
            mask_from = key.shape[2] - query.shape[2] + min(recorded) + 1 if len(recorded) else 0
        probs = _probabilities(query, key, attention_mask, scale, rec.query_rows, mask_from, hidden)  # [B, r, K]
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
