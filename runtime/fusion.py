"""Fusing stored chunk KV into one prompt cache, with selective recompute (DESIGN §4).

    layout, kv = assemble(lm, prefix, chunks, n_question)        # re-rotated, [L, 2, H_kv, N, D]
    result = fuse(lm, prefix, chunks, question_ids, "qattn", 0.15)
    tokens = greedy(lm, result.cache, result.logits, result.layout.total_len)

The recompute feeds the selected context tokens S and the question Q as new
input at their true positions over the fused cache; `ScatterLayer` writes the
fresh K/V of S into their own slots at every layer, and the mask lets each new
token attend to every key at a position <= its own. At ratio 1 this is a full
prefill (up to float rounding); at ratio 0 it is prefix caching.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from kvfuse.loader.store import ChunkData

from .attention import AttentionRecorder, record_attention
from .kvcache import cache_from_kv
from .layout import FusedLayout
from .model import LoadedModel
from .rope import rerotate_keys
from .selectors import SelectionContext, get_selector


@dataclass
class FusionResult:
    cache: object                # transformers DynamicCache, positions 0..total_len-1
    logits: torch.Tensor         # [V] float32, first generated token's logits
    layout: FusedLayout
    recomputed: torch.Tensor     # [S] absolute positions of recomputed context tokens
    timings: dict = field(default_factory=dict)

    @property
    def n_recomputed(self) -> int:
        return int(self.recomputed.numel())

    @property
    def n_reused(self) -> int:
        return self.layout.prefix_len + self.layout.context_len - self.n_recomputed


def assemble(lm: LoadedModel, prefix: ChunkData, chunks: list[ChunkData], n_question: int):
    """Lay the prefix and chunks end to end, re-rotating each chunk's keys to its new start."""
    layout = FusedLayout(
        prefix_len=prefix.kv.shape[3],
        chunk_ids=tuple(c.chunk_id for c in chunks),
        chunk_lens=tuple(c.kv.shape[3] for c in chunks),
        question_len=n_question,
    )
    inv_freq = lm.rope_inv_freq()
    device, dtype = lm.model.device, lm.spec.dtype
    parts = [prefix.kv.to(device, dtype)]
    for chunk, start in zip(chunks, layout.chunk_starts):
        kv = chunk.kv.to(device, dtype)                          # [L, 2, H_kv, T, D]
        keys = rerotate_keys(kv[:, 0], start - chunk.pos_base, inv_freq)
        parts.append(torch.stack((keys, kv[:, 1]), dim=1))
    return layout, torch.cat(parts, dim=3)                       # [L, 2, H_kv, N, D]


def _recompute_mask(positions: torch.Tensor, n_keys: int, dtype) -> torch.Tensor:
    """[1, 1, S+Q, n_keys] additive mask: query at position p sees keys at positions <= p.

    Float 0 / min, not bool: eager attention adds the mask, so a bool would mask nothing.
    """
    allowed = torch.arange(n_keys, device=positions.device)[None, :] <= positions[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@torch.inference_mode()
def recompute(lm: LoadedModel, kv: torch.Tensor, layout: FusedLayout, context_tokens: torch.Tensor,
              question_ids: torch.Tensor, selected: torch.Tensor, recorder: AttentionRecorder | None = None):
    """Run S + Q through the model over the fused cache; returns (cache, first-token logits [V])."""
    device = lm.model.device
    selected = selected.to(device)
    q_pos = torch.arange(layout.question_start, layout.total_len, device=device)
    positions = torch.cat((selected, q_pos))                                        # [S+Q]
    input_ids = torch.cat((context_tokens.to(device)[selected - layout.prefix_len], question_ids.to(device)))
    cache = cache_from_kv(kv, slots=selected if selected.numel() else None)
    # Nothing stale to skip over: the model's own causal mask is exact (and bit-identical
    # to prefix caching). Otherwise the scattered queries need key_pos <= query_pos.
    mask = None if selected.numel() == 0 else _recompute_mask(positions, layout.total_len, lm.spec.dtype)
    with record_attention(recorder) if recorder else nullcontext():
        out = lm.model(input_ids=input_ids[None].long(), position_ids=positions[None], past_key_values=cache,
                       attention_mask=mask, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1].float()


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = lm.model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in (lm.tokenizer.eos_token_id, *ids) if i is not None}


def fuse(lm: LoadedModel, prefix: ChunkData, chunks: list[ChunkData], question_ids: torch.Tensor,
         selector: str = "qattn", ratio: float = 0.15) -> FusionResult:
    """Fused prefill of [prefix][chunks][question] recomputing `ratio` of the chunk tokens."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    t0 = time.perf_counter()
    question_ids = torch.as_tensor(question_ids).long()
    layout, kv = assemble(lm, prefix, chunks, len(question_ids))
    context_tokens = torch.cat([c.tokens.long() for c in chunks]) if chunks else torch.zeros(0, dtype=torch.long)
    t_assemble = time.perf_counter()

    def probe() -> torch.Tensor:
        """Question-to-context attention [L, Q, C] from one pass of Q over the reused cache."""
        rec = AttentionRecorder()
        recompute(lm, kv, layout, context_tokens, question_ids, torch.zeros(0, dtype=torch.long), rec)
        ctx = slice(layout.prefix_len, layout.question_start)
        return torch.stack([rec.maps[l][:, ctx] for l in sorted(rec.maps)]).cpu()

    ctx = SelectionContext(layout=layout, probe=probe)
    budget = round(ratio * layout.context_len)
    selected = get_selector(selector)(ctx, budget).long().cpu()
    t_select = time.perf_counter()
    cache, logits = recompute(lm, kv, layout, context_tokens, question_ids, selected)
    t_done = time.perf_counter()
    return FusionResult(cache, logits, layout, selected, timings={
        "assemble_s": t_assemble - t0, "select_s": t_select - t_assemble,
        "recompute_s": t_done - t_select, "total_s": t_done - t0,
    })


@torch.inference_mode()
def full_prefill(lm: LoadedModel, token_ids: torch.Tensor):
    """Reference: plain prefill of all token ids; returns (cache, first-token logits [V])."""
    from transformers.cache_utils import DynamicCache

    ids = torch.as_tensor(token_ids).long().to(lm.model.device)[None]
    cache = DynamicCache()
    out = lm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1].float()


@torch.inference_mode()
def greedy(lm: LoadedModel, cache, first_logits: torch.Tensor, next_pos: int, max_new_tokens: int = 32) -> list[int]:
    """Greedy decoding from a prefilled cache; stops at the tokenizer's EOS."""
    eos = _eos_ids(lm)
    device = lm.model.device
    token = int(first_logits.argmax())
    out = [token]
    for _ in range(max_new_tokens - 1):
        if token in eos:
            break
        step = lm.model(input_ids=torch.tensor([[token]], device=device),
                        position_ids=torch.tensor([[next_pos]], device=device),
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_pos += 1
        token = int(step.logits[0, -1].argmax())
        out.append(token)
    return out
