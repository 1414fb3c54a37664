"""Fusing stored chunk KV into one prompt cache, with selective recompute (DESIGN §4).

    layout, kv = assemble(lm, prefix, chunks, n_question)        # re-rotated, [L, 2, H_kv, N, D]
    result = fuse(lm, prefix, chunks, question_ids, "kvfuse", 0.15)
    prep = prepare(lm, prefix, chunks, question_ids)             # shared by several selectors / ratios
    result = run(prep, "prophet", 0.1)
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
from .guards import probe_view
from .kvcache import cache_from_kv, kv_from_cache
from .layout import FusedLayout
from .model import LoadedModel, cache_kwargs
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
              question_ids: torch.Tensor, selected: torch.Tensor, recorder: AttentionRecorder | None = None,
              cache_factory=cache_from_kv):
    """Run S + Q through the model over the fused cache; returns (cache, first-token logits [V]).

    cache_factory(kv, slots=...) builds the cache (the layer-wise loader passes its own)."""
    device = lm.model.device
    selected = selected.to(device)
    q_pos = torch.arange(layout.question_start, layout.total_len, device=device)
    positions = torch.cat((selected, q_pos))                                        # [S+Q]
    input_ids = torch.cat((context_tokens.to(device)[selected - layout.prefix_len], question_ids.to(device)))
    cache = cache_factory(kv, slots=selected if selected.numel() else None)
    # Nothing stale to skip over: the model's own causal mask is exact (and bit-identical
    # to prefix caching). Otherwise the scattered queries need key_pos <= query_pos.
    mask = None if selected.numel() == 0 else _recompute_mask(positions, layout.total_len, lm.spec.dtype)
    with record_attention(recorder) if recorder else nullcontext():
        out = lm.model(input_ids=input_ids[None].long(), position_ids=positions[None], **cache_kwargs(lm.model, cache),
                       attention_mask=mask, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1].float()


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = lm.model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in (lm.tokenizer.eos_token_id, *ids) if i is not None}


@dataclass
class Prepared:
    """A fused prompt ready for selection: the assembled cache and one `SelectionContext`
    whose lazily computed signals (question attention, layer-1 K/V) every selector and
    ratio run on this prompt shares."""
    lm: LoadedModel
    layout: FusedLayout
    kv: torch.Tensor                 # [L, 2, H_kv, N, D] re-rotated, N = question_start
    context_tokens: torch.Tensor     # [C]
    question_ids: torch.Tensor       # [Q]
    ctx: SelectionContext
    assemble_s: float


def prepare(lm: LoadedModel, prefix: ChunkData, chunks: list[ChunkData], question_ids: torch.Tensor) -> Prepared:
    """Assemble [prefix][chunks] for `question_ids` and wire the selectors' lazy signals."""
    t0 = time.perf_counter()
    question_ids = torch.as_tensor(question_ids).long()
    layout, kv = assemble(lm, prefix, chunks, len(question_ids))
    context_tokens = torch.cat([c.tokens.long() for c in chunks]) if chunks else torch.zeros(0, dtype=torch.long)
    saliency = torch.cat([c.saliency for c in chunks], dim=1) if chunks else None  # [S, C]

    def attend(selected: torch.Tensor) -> torch.Tensor:
        """Question-to-context attention [L, Q, C] from one pass of `selected` + Q over the fused cache."""
        rec = AttentionRecorder(query_rows=slice(selected.numel(), None))
        p_layout, p_question = probe_view(layout, question_ids)  # at most the last PROBE_QUESTION_TOKENS
        recompute(lm, kv, p_layout, context_tokens, p_question, selected, rec)
        ctx_cols = slice(layout.prefix_len, layout.question_start)
        return torch.stack([rec.maps[l][:, ctx_cols] for l in sorted(rec.maps)]).cpu()

    def recompute_layer(layer: int) -> torch.Tensor:
        return recompute_context_layer(lm, kv, layout, context_tokens, layer)

    ctx = SelectionContext(layout=layout, kv=kv, attend=attend, recompute_layer=recompute_layer, saliency=saliency)
    return Prepared(lm, layout, kv, context_tokens, question_ids, ctx, time.perf_counter() - t0)


def run(prep: Prepared, selector: str = "kvfuse", ratio: float = 0.15) -> FusionResult:
    """Select `ratio` of the context tokens of a prepared prompt and recompute them with the question."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    select = get_selector(selector)
    ctx = prep.ctx
    ctx.used.clear()
    paid_before = sum(ctx.costs.values())
    t0 = time.perf_counter()
    budget = round(ratio * prep.layout.context_len)
    selected = select(ctx, budget).long().cpu()
    t_select = time.perf_counter()
    cache, logits = recompute(prep.lm, prep.kv, prep.layout, prep.context_tokens, prep.question_ids, selected)
    t_done = time.perf_counter()
    # Signals are shared between runs on one prompt: charge each run what its signals cost,
    # whether it computed them now or found them cached, so timings compare fairly.
    own_select = (t_select - t0) - (sum(ctx.costs.values()) - paid_before)
    select_s = own_select + ctx.signal_seconds()
    return FusionResult(cache, logits, prep.layout, selected, timings={
        "assemble_s": prep.assemble_s, "select_s": select_s,
        "recompute_s": t_done - t_select, "total_s": prep.assemble_s + select_s + t_done - t_select,
    })


def fuse(lm: LoadedModel, prefix: ChunkData, chunks: list[ChunkData], question_ids: torch.Tensor,
         selector: str = "kvfuse", ratio: float = 0.15) -> FusionResult:
    """Fused prefill of [prefix][chunks][question] recomputing `ratio` of the chunk tokens."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    get_selector(selector)  # fail before any work
    return run(prepare(lm, prefix, chunks, question_ids), selector, ratio)


class _StopAfterLayer(Exception):
    pass


@torch.inference_mode()
def recompute_context_layer(lm: LoadedModel, kv: torch.Tensor, layout: FusedLayout, context_tokens: torch.Tensor,
                            layer: int) -> torch.Tensor:
    """Fresh K/V [2, H_kv, C, D] of every context token at `layer`, with the full context
    (layers 0..layer are run over all C tokens; the layers above are skipped)."""
    device = lm.model.device
    positions = layout.context_positions().to(device)                                 # [C]
    cache = cache_from_kv(kv[:layer + 1].to(device), slots=positions)
    mask = _recompute_mask(positions, layout.question_start, lm.spec.dtype)

    def stop(*_):
        raise _StopAfterLayer

    hook = lm.model.model.layers[layer].register_forward_hook(stop)
    try:
        lm.model.model(input_ids=context_tokens.to(device)[None], position_ids=positions[None],
                       **cache_kwargs(lm.model.model, cache), attention_mask=mask, use_cache=True)
    except _StopAfterLayer:
        pass
    finally:
        hook.remove()
    # on the stored cache's device, so selectors can compare the two (cacheblend's deviation)
    return kv_from_cache(cache, layout.prefix_len, layout.question_start)[layer].to(kv.device)  # [2, H_kv, C, D]


@torch.inference_mode()
def full_prefill(lm: LoadedModel, token_ids: torch.Tensor):
    """Reference: plain prefill of all token ids; returns (cache, first-token logits [V])."""
    from transformers.cache_utils import DynamicCache

    ids = torch.as_tensor(token_ids).long().to(lm.model.device)[None]
    cache = DynamicCache()
    out = lm.model(input_ids=ids, **cache_kwargs(lm.model, cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1].float()


@torch.inference_mode()
def greedy(lm: LoadedModel, cache, first_logits: torch.Tensor, next_pos: int, max_new_tokens: int = 32,
           stop_ids: set[int] = frozenset()) -> list[int]:
    """Greedy decoding from a prefilled cache; stops at the tokenizer's EOS (or any of `stop_ids`)."""
    eos = _eos_ids(lm) | set(stop_ids)
    device = lm.model.device
    token = int(first_logits.argmax())
    out = [token]
    for _ in range(max_new_tokens - 1):
        if token in eos:
            break
        step = lm.model(input_ids=torch.tensor([[token]], device=device),
                        position_ids=torch.tensor([[next_pos]], device=device),
                        **cache_kwargs(lm.model, cache), use_cache=True, logits_to_keep=1)
        next_pos += 1
        token = int(step.logits[0, -1].argmax())
        out.append(token)
    return out


@torch.inference_mode()
def greedy_batch(lm: LoadedModel, caches: list, first_logits: list[torch.Tensor], next_pos: int,
                 max_new_tokens: int = 32, stop_ids: set[int] = frozenset()) -> list[list[int]]:
    """`greedy` for several prefilled caches of one length at once (one forward per step for all).

    Decoding is bound by reading the weights, so B prompts cost about one. Float rounding of the
    batched matmuls may differ from `greedy` in the last bits.
    """
    from transformers.cache_utils import DynamicCache

    from .kvcache import ScatterLayer

    eos = _eos_ids(lm) | set(stop_ids)
    device = lm.model.device
    cache = DynamicCache()
    cache.layers = [ScatterLayer(torch.cat([c.layers[l].keys for c in caches]),       # [B, H_kv, N, D]
                                 torch.cat([c.layers[l].values for c in caches]))
                    for l in range(len(caches[0].layers))]
    tokens = torch.stack([l.argmax() for l in first_logits]).to(device)               # [B]
    out = [[int(t)] for t in tokens]
    done = torch.tensor([int(t) in eos for t in tokens])
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        step = lm.model(input_ids=tokens[:, None], position_ids=torch.full((len(caches), 1), next_pos, device=device),
                        **cache_kwargs(lm.model, cache), use_cache=True, logits_to_keep=1)
        next_pos += 1
        tokens = step.logits[:, -1].argmax(-1)
        for b, t in enumerate(tokens.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos
    return out
