"""Precomputing chunk KV and its saliency prior (DESIGN §3 step 4, §4).

    prefix_kv = prefill_prefix(lm, prefix_ids)                       # [L, 2, H_kv, P, D]
    kv, sal = prefill_chunk(lm, prefix_kv, chunk_ids)               # isolated
    [(kv, sal), ...] = prefill_chunks(lm, prefix_kv, [ids_a, ids_b])  # isolated, one length, batched (GPU)
    kv, sal = prefill_chunk(lm, prefix_kv, chunk_ids, neighbour_ids)  # FusionRAG-enriched
    emb = embed_chunk(lm, prefix_kv, chunk_ids, keep, prefix_ids)   # [hidden] float32, keeps the isolated KV
    embs = embed_chunks(lm, prefix_kv, [ids_a, ids_b], keep, prefix_ids)  # [2, hidden]: one length, batched (GPU)
    kv, sal = prefill_chunk(lm, prefix_kv, chunk_ids, neighbour_ids,  # enriched, without rerunning that pass
                            isolated=keep.take(lm, prefix_ids, chunk_ids))

A chunk is prefilled over the stored prefix cache (exactly what prefix caching
does), so at ratio 0 with the chunk at its stored position the fused cache is
bit-identical to prefix caching. Enrichment prefills
`[prefix][neighbours][chunk]` and keeps only the chunk's slice; its keys are
then at positions P+E.. (E = neighbour tokens), which the index records as
`pos_base`.

Saliency rows (`SALIENCY_SIGNALS`):
  0 attn_received: attention mass each chunk token receives from the chunk tokens
    after it, mean over heads and over every k-th layer (at most 8 layers:
    `saliency_layers`), divided by how many queries can see it.
  1 kv_deviation: how much the token's K/V moved because of the neighbours:
    mean over layers of (|K_enr - K_iso| / |K_enr| + |V_enr - V_iso| / |V_enr|) / 2,
    norms over heads and head dims, the isolated keys re-rotated to the enriched
    positions first. 0 for isolated chunks (CacheBlend's signal, paid offline).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers.cache_utils import DynamicCache

from kvfuse.loader.format import SALIENCY_SIGNALS
from kvfuse.runtime.attention import IMPLEMENTATION, AttentionRecorder, record_attention, use_kvfuse_attention
from kvfuse.runtime.kvcache import cache_from_kv, kv_from_cache
from kvfuse.runtime.model import LoadedModel, cache_kwargs
from kvfuse.runtime.rope import rerotate_keys

from .isolated_kv import IsolatedKV


@torch.inference_mode()
def prefill_prefix(lm: LoadedModel, prefix_ids) -> torch.Tensor:
    ids = torch.as_tensor(prefix_ids).long().to(lm.model.device)[None]
    cache = DynamicCache()
    lm.model.model(input_ids=ids, **cache_kwargs(lm.model.model, cache), use_cache=True)  # the bare decoder: no logits
    return kv_from_cache(cache)  # [L, 2, H_kv, P, D]


def _prefill_after_prefix(lm: LoadedModel, prefix_kv: torch.Tensor, ids: torch.Tensor,
                          recorder: AttentionRecorder | None = None):
    """Run ids [N] (or a batch [B, N], each sequence after its own copy of the prefix) after the
    prefix cache; returns (cache, last hidden states [N, hidden]; [B, N, hidden] for a batch)."""
    device = lm.model.device
    P = prefix_kv.shape[3]
    batch = ids if ids.dim() == 2 else ids[None]                                        # [B, N]
    B, N = batch.shape
    cache = cache_from_kv(prefix_kv.to(device), batch=B)
    positions = torch.arange(P, P + N, device=device)[None].expand(B, N)
    if device.type == "cuda":  # a pinned, non-blocking copy: no wait for the previous chunk's kernels
        batch = batch.pin_memory()
    batch = batch.to(device, non_blocking=True)
    with record_attention(recorder) if recorder is not None else nullcontext():
        out = lm.model.model(input_ids=batch, position_ids=positions, **cache_kwargs(lm.model.model, cache),
                             use_cache=True)
    return cache, out.last_hidden_state[0] if ids.dim() == 1 else out.last_hidden_state


@torch.inference_mode()
def embed_chunk(lm: LoadedModel, prefix_kv: torch.Tensor, chunk_ids, keep: IsolatedKV | None = None,
                prefix_ids=(), to_cpu: bool = True) -> torch.Tensor:
    """The "model" embedder: mean of the final hidden states of the chunk prefilled alone
    after the shared prefix. Returns [hidden] float32 on the CPU (to_cpu=False: on the model's device).

    That pass is exactly the isolated pass an enriched chunk needs for kv_deviation: with
    `keep` (and the prefix's token ids, prefix_kv's key there), its KV [L, 2, H_kv, T, D]
    is kept there, on the model's device, for prefill_chunk.
    """
    return embed_chunks(lm, prefix_kv, [chunk_ids], keep, prefix_ids, to_cpu)[0]


@torch.inference_mode()
def embed_chunks(lm: LoadedModel, prefix_kv: torch.Tensor, chunks: list, keep: IsolatedKV | None = None,
                 prefix_ids=(), to_cpu: bool = True) -> torch.Tensor:
    """`embed_chunk` for chunks of one length in one batched forward: [B, hidden] float32 (and
    each chunk's isolated KV kept, with `keep`). A GPU forward of one 512-token chunk is bound
    by the host launching its kernels, so B chunks cost little more than one. Raises ValueError
    for chunks of different lengths."""
    ids = [list(c) for c in chunks]
    if any(len(c) != len(ids[0]) for c in ids):
        raise ValueError(f"embed_chunks needs chunks of one length, got {sorted({len(c) for c in ids})}")
    T, P = len(ids[0]), prefix_kv.shape[3]
    cache, hidden = _prefill_after_prefix(lm, prefix_kv, torch.tensor(ids, dtype=torch.long))    # [B, T, hidden]
    if keep is not None and keep.accepts(lm):
        for b, chunk_ids in enumerate(chunks):
            keep.put(lm, prefix_ids, chunk_ids, kv_from_cache(cache, P, P + T, seq=b))
    emb = hidden.float().mean(1)                                                                 # [B, hidden]
    return emb.cpu() if to_cpu else emb


@torch.inference_mode()
def prefill_chunk(lm: LoadedModel, prefix_kv: torch.Tensor, chunk_ids, neighbour_ids=(),
                  to_cpu: bool = True, isolated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KV of `chunk_ids` prefilled after [prefix][neighbours]; returns (kv [L,2,H_kv,T,D], saliency [S,T] float16).

    With neighbours the chunk is also prefilled alone (for kv_deviation), so an
    enriched chunk costs T + (E + T) prefilled tokens, unless `isolated` (that
    pass's KV [L, 2, H_kv, T, D], kept by embed_chunk) is given: then E + T.
    to_cpu=False leaves kv and saliency on the model's device and syncs nothing
    (the build copies them out on a side stream, overlapping the next chunk).
    """
    if lm.model.config._attn_implementation != IMPLEMENTATION:
        use_kvfuse_attention(lm.model)  # records attention for the saliency prior
    chunk = torch.as_tensor(chunk_ids).long()
    extra = torch.as_tensor(list(neighbour_ids), dtype=torch.long)
    P, E, T = prefix_kv.shape[3], len(extra), len(chunk)
    recorder = AttentionRecorder(layers=saliency_layers(lm.spec.n_layers), query_rows=slice(E, E + T))
    cache, _ = _prefill_after_prefix(lm, prefix_kv, torch.cat((extra, chunk)), recorder)
    kv = kv_from_cache(cache, P + E, P + E + T)  # [L, 2, H_kv, T, D]
    del cache

    probs = torch.stack([recorder.maps[l] for l in sorted(recorder.maps)])  # [L', T, P+E+T]
    saliency = _saliency_rows(probs, P + E)                                  # float32, rounded once below
    if E:
        if isolated is None:
            iso_cache, _ = _prefill_after_prefix(lm, prefix_kv, chunk)
            isolated = kv_from_cache(iso_cache, P, P + T)
        saliency[1] = kv_deviation(kv, isolated.to(kv.device), E, lm.rope_inv_freq())
    saliency = saliency.to(torch.float16)
    return (kv.cpu(), saliency.cpu()) if to_cpu else (kv, saliency)


@torch.inference_mode()
def prefill_chunks(lm: LoadedModel, prefix_kv: torch.Tensor, chunks: list, to_cpu: bool = True
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Isolated chunks of one length, prefilled after the prefix in one batched forward:
    [(kv [L, 2, H_kv, T, D], saliency [S, T] float16)], what `prefill_chunk` gives each alone.

    On a GPU a 512-token forward of an 8B model is bound by the host launching its kernels
    (H200, Llama-3-8B shape: 33 ms a chunk for 19 ms of GPU work), so B chunks per forward
    cost little more than one. The values equal `prefill_chunk`'s to rounding (a batched GEMM
    may sum in another order). Raises ValueError for chunks of different lengths.
    """
    if lm.model.config._attn_implementation != IMPLEMENTATION:
        use_kvfuse_attention(lm.model)
    ids = [list(c) for c in chunks]
    T = len(ids[0])
    if any(len(c) != T for c in ids):
        raise ValueError(f"prefill_chunks needs chunks of one length, got {sorted({len(c) for c in ids})}")
    B, P = len(ids), prefix_kv.shape[3]
    recorder = AttentionRecorder(layers=saliency_layers(lm.spec.n_layers), batched=True)
    cache, _ = _prefill_after_prefix(lm, prefix_kv, torch.tensor(ids, dtype=torch.long), recorder)  # [B, T]
    probs = torch.stack([recorder.maps[l] for l in sorted(recorder.maps)])              # [L', B, T, P+T]
    out = []
    for b in range(B):
        kv, sal = kv_from_cache(cache, P, P + T, seq=b), _saliency_rows(probs[:, b], P).to(torch.float16)
        out.append((kv.cpu(), sal.cpu()) if to_cpu else (kv, sal))
    return out


def _saliency_rows(probs: torch.Tensor, start: int) -> torch.Tensor:
    """[S, T] float32 saliency of a chunk from the attention maps probs [L', T, K] of its T rows
    (columns `start`.. are the chunk's own): attn_received filled, kv_deviation left 0."""
    T = probs.shape[1]
    received = probs[:, :, start:].float().mean(0).sum(0)                   # [T]
    saliency = torch.zeros(len(SALIENCY_SIGNALS), T, device=received.device)
    saliency[0] = received / torch.arange(T, 0, -1, device=received.device)
    return saliency


def saliency_layers(n_layers: int, most: int = 8) -> set[int]:
    """The layers attn_received is measured at: every k-th layer, at most `most` of them
    (materialising attention probabilities costs ~3% of a layer's prefill on the CPU)."""
    return set(range(0, n_layers, -(-n_layers // most)))


def kv_deviation(kv: torch.Tensor, iso: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Per-token relative deviation [T] between enriched kv and isolated iso ([L, 2, H_kv, T, D]);
    iso's keys were computed `shift` positions earlier and are re-rotated first."""
    k_iso = rerotate_keys(iso[:, 0], shift, inv_freq).float()  # [L, H_kv, T, D]
    k, v, v_iso = kv[:, 0].float(), kv[:, 1].float(), iso[:, 1].float()

    def rel(a, b):  # [L, H, T, D] -> [L, T]
        return (a - b).norm(dim=(1, 3)) / a.norm(dim=(1, 3)).clamp_min(1e-6)

    return ((rel(k, k_iso) + rel(v, v_iso)) / 2).mean(0)  # [T]
