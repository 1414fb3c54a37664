"""Precomputing chunk KV and its saliency prior (DESIGN §3 step 4, §4).

    prefix_kv = prefill_prefix(lm, prefix_ids)                     # [L, 2, H_kv, P, D]
    kv, sal = prefill_chunk(lm, prefix_kv, chunk_ids)             # [L, 2, H_kv, T, D], [S, T]

A chunk is prefilled over the stored prefix cache (exactly what prefix caching
does), so at ratio 0 with the chunk at its stored position the fused cache is
bit-identical to prefix caching. Neighbours (FusionRAG enrichment) go between
prefix and chunk when given; only the chunk's slice is kept.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from kvfuse.loader.format import SALIENCY_SIGNALS
from kvfuse.runtime.attention import AttentionRecorder, record_attention
from kvfuse.runtime.kvcache import cache_from_kv, kv_from_cache
from kvfuse.runtime.model import LoadedModel


@torch.inference_mode()
def prefill_prefix(lm: LoadedModel, prefix_ids) -> torch.Tensor:
    ids = torch.as_tensor(prefix_ids).long().to(lm.model.device)[None]
    cache = DynamicCache()
    lm.model.model(input_ids=ids, past_key_values=cache, use_cache=True)  # the bare decoder: no logits
    return kv_from_cache(cache)  # [L, 2, H_kv, P, D]


@torch.inference_mode()
def prefill_chunk(lm: LoadedModel, prefix_kv: torch.Tensor, chunk_ids, neighbour_ids=()) -> tuple[torch.Tensor, torch.Tensor]:
    """KV of `chunk_ids` prefilled after [prefix][neighbours]; returns (kv [L,2,H_kv,T,D], saliency [S,T])."""
    device = lm.model.device
    chunk = torch.as_tensor(chunk_ids).long()
    extra = torch.as_tensor(list(neighbour_ids), dtype=torch.long)
    ids = torch.cat((extra, chunk)).to(device)[None]
    P, E, T = prefix_kv.shape[3], len(extra), len(chunk)
    cache = cache_from_kv(prefix_kv.to(device))
    positions = torch.arange(P, P + E + T, device=device)[None]
    recorder = AttentionRecorder(query_rows=slice(E, E + T))
    with record_attention(recorder):
        lm.model.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
    kv = kv_from_cache(cache, P + E, P + E + T)  # [L, 2, H_kv, T, D]

    # Saliency prior: attention each chunk token receives from the chunk tokens after it
    # (mean over layers and heads, normalised by how many queries can see it).
    probs = torch.stack([recorder.maps[l] for l in sorted(recorder.maps)])  # [L, T, P+E+T]
    received = probs[:, :, P + E:].float().mean(0).sum(0)                  # [T]
    received = received / torch.arange(T, 0, -1, device=received.device)
    saliency = torch.zeros(len(SALIENCY_SIGNALS), T)
    saliency[0] = received.cpu()
    # kv_deviation (row 1) needs the isolated KV; it is filled by the enrichment stage.
    return kv.cpu(), saliency.to(torch.float16)
