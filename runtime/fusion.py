"""The fusion driver: stored chunk KV + selective recompute -> one prompt cache (DESIGN §4).

    layout, kv = assemble(lm, prefix, chunks, n_question)        # re-rotated, [L, 2, H_kv, N, D]
    result = fuse(lm, prefix, chunks, question_ids, "kvfuse", 0.15)
    prep = prepare(lm, prefix, chunks, question_ids)             # shared by several selectors / ratios
    result = run(prep, "prophet", 0.1)
    tokens = greedy(lm, result.cache, result.logits, result.layout.total_len)

One driver for every source of KV: `prepare_from(lm, fused_kv, question_ids)`
wires the selectors' signals over a `FusedKV` and `run` selects and recomputes.
Two sources implement `FusedKV`:

* `HostKV` (here): every chunk present at once, assembled on the model's device
  (`prepare` / `fuse`, the CPU path and the eval harness);
* `layerwise.LayerwiseLoad`: the tiers' GPU slots, arriving layer by layer on
  CUDA side streams (`layerwise.fuse_layerwise`); its caches make the compute
  stream wait for each layer, and the probe reads only the layers it needs.

The recompute feeds the selected context tokens S and the question Q as new
input at their true positions over the fused cache; `ScatterLayer` writes the
fresh K/V of S into their own slots at every layer, and the attention lets each
new token attend to every key at a position <= its own (`recompute_attention`:
FlexAttention with a block mask on CUDA, SDPA with one boolean mask elsewhere;
no dense float mask, no `repeat_kv`). At ratio 1 this is a full prefill (up to
float rounding); at ratio 0 it is prefix caching.

A selector may return a `LayerPlan` instead of a fixed set (gradual filtering):
the pass starts with a larger set S_0 and, at the layers where the plan's
`keep` drops, keeps only the tokens of the current set the question attended to
most in the layers just run (`LayerNarrowing`: the question rows' attention is
recorded inside the pass, a few extra rows of scores), so the selection's later
stages cost nothing beyond the recompute. Dropped tokens read their stored KV
from that layer on. A constant plan is the fixed set, exactly.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvfuse.loader.store import ChunkData

from . import recompute_attention
from .attention import IMPLEMENTATION, AttentionRecorder, record_attention
from .kvcache import PeekLayer, RepairLayer, cache_from_kv, kv_from_cache
from .guards import probe_view
from .layout import FusedLayout
from .model import LoadedModel, cache_kwargs
from .rope import rerotate_keys
from .selectors import LayerPlan, SelectionContext, get_selector

# How many layers (from 0) a selector's question probe reads (0: no probe); others probe every
# layer. A request that runs one selector (`fuse`, the tiered path) probes only that deep.
PROBE_LAYERS = {"a3": 2, "epic": 0, "reuse": 0, "full": 0}
# Selectors that score on device tensors as they are: on CUDA their selection stays on the GPU,
# so the host queues the recompute right behind the probe instead of waiting for its result.
# (A selector function may also say so itself: `select.on_device = True`.)
DEVICE_SELECTORS = {"a3"}


@dataclass
class FusionResult:
    cache: object                # transformers DynamicCache, positions 0..total_len-1
    logits: torch.Tensor         # [V] float32, first generated token's logits
    layout: FusedLayout
    recomputed: torch.Tensor     # [S] absolute positions of recomputed context tokens (a plan's: at layer 0)
    timings: dict = field(default_factory=dict)
    layer_counts: list[int] | None = None   # a `LayerPlan`'s context tokens recomputed per layer [L]
    kept: torch.Tensor | None = None         # a `LayerPlan`'s set at the last layer [S_{L-1}]

    @property
    def n_recomputed(self) -> int:
        """Context tokens recomputed; for a layer plan the per-layer mean (its FLOPs in tokens)."""
        if self.layer_counts is not None:
            return round(sum(self.layer_counts) / len(self.layer_counts))
        return int(self.recomputed.numel())

    @property
    def n_reused(self) -> int:
        return self.layout.prefix_len + self.layout.context_len - self.n_recomputed


def probe_depth(selector: str, n_layers: int) -> int:
    """Layers 0..d-1 a selector's plain question probe reads (n_layers: all). ValueError if unknown."""
    fn = get_selector(selector)
    depth = PROBE_LAYERS[selector] if selector in PROBE_LAYERS else getattr(fn, "probe_layers", None)
    if depth is None and getattr(fn, "probe_share", None) is not None:   # a share of the layers, from layer 0
        depth = max(1, round(fn.probe_share * n_layers))
    return n_layers if depth is None else min(n_layers, depth)


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


class FusedKV(Protocol):
    """Where the driver reads a prompt's fused, re-rotated stored KV from."""

    layout: FusedLayout
    context_tokens: torch.Tensor     # [C] int64
    saliency: torch.Tensor | None    # [S_sig, C] offline prior
    timings: dict                    # what getting here cost ("assemble_s" or "open_s", seconds)

    @property
    def stored(self) -> torch.Tensor: ...          # [L, 2, H_kv, N, D]; read it after wait_all()

    def cache(self, slots: torch.Tensor | None, peek: bool = False): ...  # the recompute's / probe's cache

    def wait_all(self) -> None: ...                # the compute stream may read every layer from now on

    def repair_cache(self, slots: torch.Tensor): ...  # a cache over this run's working KV that keeps the
                                                   # slots' fresh K/V (`kvcache.RepairLayer`); the final
                                                   # recompute's `cache` then reads them

    def reset_working(self) -> None: ...           # a new run starts from the stored KV again

    def close(self) -> dict: ...                   # release; returns the load's counters


class HostKV:
    """Every chunk's KV present at once: assembled on the model's device, re-rotated.

    Caches are copies (the recompute writes into its cache), so one HostKV serves any
    number of runs (the eval harness's selectors and ratios on one prompt). A run that
    repairs tokens during selection (`SelectionContext.repair`) gets its own working copy,
    which its final recompute's cache then takes over (no second copy)."""

    def __init__(self, lm: LoadedModel, prefix: ChunkData, chunks: list[ChunkData], n_question: int):
        t0 = time.perf_counter()
        self.layout, self.kv = assemble(lm, prefix, chunks, n_question)          # [L, 2, H_kv, N, D]
        self.context_tokens = (torch.cat([c.tokens.long() for c in chunks]) if chunks
                               else torch.zeros(0, dtype=torch.long))             # [C]
        self.saliency = torch.cat([c.saliency for c in chunks], dim=1) if chunks else None  # [S_sig, C]
        self.timings = {"assemble_s": time.perf_counter() - t0}
        self._working: torch.Tensor | None = None                                 # this run's repaired copy

    @property
    def stored(self) -> torch.Tensor:
        return self.kv

    def cache(self, slots: torch.Tensor | None, peek: bool = False):
        if peek and slots is None:
            return PeekLayer.cache(self.kv)
        if self._working is not None and not peek:     # the final recompute over the run's repairs
            working, self._working = self._working, None
            return cache_from_kv(working[:, :, :, :self.layout.question_start], slots=slots, copy=False)
        return cache_from_kv(self.kv, slots=slots)

    def wait_all(self) -> None:
        pass

    def repair_cache(self, slots: torch.Tensor):
        if self._working is None:                        # this run's copy, with room for the question
            kv = self.kv
            self._working = kv.new_empty((*kv.shape[:3], kv.shape[3] + self.layout.question_len, kv.shape[4]))
            self._working[:, :, :, :kv.shape[3]] = kv
        return RepairLayer.cache(self._working, self.layout.question_start, slots)

    def reset_working(self) -> None:
        self._working = None

    def close(self) -> dict:
        return {}


def _recompute_mask(positions: torch.Tensor, n_keys: int, dtype) -> torch.Tensor:
    """[1, 1, S+Q, n_keys] additive mask: query at position p sees keys at positions <= p.

    Float 0 / min, not bool: eager attention adds the mask, so a bool would mask nothing.
    Only for models not on the `kvfuse` attention (which needs no mask: `recompute_attention`)."""
    allowed = torch.arange(n_keys, device=positions.device)[None, :] <= positions[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _scattered(lm: LoadedModel, positions: torch.Tensor, n_keys: int, attention: str | None, groups: int | None,
               host_positions: torch.Tensor | None = None):
    """(context for the forward, attention_mask) of a pass of queries at `positions` [R]
    (`host_positions`: the same on the host, when the caller has them)."""
    if lm.model.config._attn_implementation == IMPLEMENTATION:
        backend = "grouped" if groups is not None and groups > 1 else attention
        return recompute_attention.scattered_queries(positions, n_keys, backend, groups, host_positions), None
    return nullcontext(), _recompute_mask(positions, n_keys, lm.spec.dtype)


class LayerNarrowing:
    """Runs a `LayerPlan` inside one recompute pass (forward pre-hooks on the decoder layers).

    Rows are the pass's input tokens: S_0 (ascending positions) then the Q question tokens.
    The question rows' attention is recorded at the layers before each narrowing; at a layer
    where keep drops, the candidates' scores (each layer's attention summed over question
    tokens, normalised to sum 1 over the candidates, averaged over the layers since the last
    narrowing; pinned tokens first) pick the kept rows, and from that layer on the hidden
    states, position embeddings, position ids, mask rows, the cache layer's write slots and
    the scattered attention's queries are those rows'. Everything stays on the device: no
    host sync (the counts are the plan's). `kept` [S_{L-1}] holds the last layer's positions."""

    def __init__(self, model, plan: LayerPlan, positions: torch.Tensor, n_question: int, cache):
        self.layers = model.model.layers
        self.plan, self.cache, self.n_question = plan, cache, n_question
        self.positions = positions                                          # [S_0 + Q] on the device
        device = positions.device
        n0 = plan.keep[0]
        self.rows = torch.arange(n0 + n_question, device=device)           # live rows, into the pass's input
        self.pinned = torch.zeros(n0, dtype=torch.bool, device=device)      # [S_0]
        if plan.pinned is not None and plan.pinned.numel():
            self.pinned = torch.isin(positions[:n0], plan.pinned.to(device))
        self.points = [l for l in range(1, len(plan.keep)) if plan.keep[l] < plan.keep[l - 1]]
        self.windows = {}                                                   # narrowing layer -> scored layers
        since = 0
        for p in self.points:
            self.windows[p] = range(max(since, p - plan.window) if plan.window else since, p)
            since = p
        self.recorder = AttentionRecorder(layers={l for w in self.windows.values() for l in w},
                                          query_rows=slice(-n_question, None) if n_question else slice(0, 0))
        self.handles = []
        self.kept = positions[:n0]

    def __enter__(self):
        if self.points:
            for l in range(self.points[0], len(self.layers)):
                self.handles.append(self.layers[l].register_forward_pre_hook(self._hook(l), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False

    def _scores(self, layer: int) -> torch.Tensor:
        """[S_cur] the candidates' question attention, fused over the window's layers."""
        ctx_pos = self.positions[self.rows[:self.rows.numel() - self.n_question]]
        total = torch.zeros(ctx_pos.numel(), device=ctx_pos.device)
        for l in self.windows[layer]:
            attn = self.recorder.maps.pop(l)[:, ctx_pos].float().sum(0)          # [S_cur]
            total += attn / attn.sum().clamp_min(1e-12)
        return total

    def _narrow(self, layer: int) -> None:
        keep = self.plan.keep[layer]
        n_cur = self.rows.numel() - self.n_question
        scores = self._scores(layer).masked_fill(self.pinned[self.rows[:n_cur]], float("inf"))
        top = torch.sort(scores, descending=True, stable=True).indices[:keep].sort().values     # [keep] local rows
        self.rows = torch.cat((self.rows[top], self.rows[n_cur:]))
        self.local = torch.cat((top, torch.arange(n_cur, n_cur + self.n_question, device=top.device)))
        self.kept = self.positions[self.rows[:keep]]
        recompute_attention.narrow(self.positions[self.rows])

    def _hook(self, layer: int):
        def pre(module, args, kwargs):
            narrowing = layer in self.points
            if narrowing:
                self._narrow(layer)
            rows = self.rows
            self.cache.layers[layer].slots = self.kept
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if narrowing:
                hidden = hidden[:, self.local]                                   # [1, S_l + Q, d]
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos[:, rows], sin[:, rows])
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"][:, rows]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape[-2] == self.positions.numel():
                kwargs["attention_mask"] = mask[..., rows, :]
            return (hidden, *args[1:]), kwargs
        return pre


@torch.inference_mode()
def recompute(lm: LoadedModel, kv, layout: FusedLayout, context_tokens: torch.Tensor,
              question_ids: torch.Tensor, selected, recorder: AttentionRecorder | None = None,
              cache_factory=None, attention: str | None = None, groups: int | None = None, peek: bool = False,
              narrowing: list | None = None):
    """Run S + Q through the model over the fused cache; returns (cache, first-token logits [V]).

    selected: positions [S], or a `LayerPlan` (S = its initial set, narrowed with depth; the
    `LayerNarrowing` is appended to `narrowing` when a list is given, for its `kept` set).
    kv: the stored KV [L, 2, H_kv, N, D] or a `FusedKV` (whose `cache` is used).
    cache_factory(kv, slots=...) builds the cache instead (default: a copy of kv).
    attention: the recompute's attention backend (`recompute_attention.BACKENDS`; default
    per device); groups > 1: the `grouped` backend with that many query groups.
    peek (with no selection): a read-only cache, for probes."""
    device = lm.model.device
    plan = selected if isinstance(selected, LayerPlan) else None
    if plan is not None:
        selected = plan.initial
    selected = selected.sort().values                                              # ascending, where it is
    host_positions = None   # the positions on the host, when the picks are there (no sync to get them)
    if selected.device.type == "cpu":
        host_positions = torch.cat((selected, torch.arange(layout.question_start, layout.total_len)))
    selected = selected.to(device)
    q_pos = torch.arange(layout.question_start, layout.total_len, device=device)
    positions = torch.cat((selected, q_pos))                                        # [S+Q]
    input_ids = torch.cat((context_tokens.to(device)[selected - layout.prefix_len], question_ids.to(device)))
    slots = selected if selected.numel() else None
    if cache_factory is not None:
        cache = cache_factory(kv, slots=slots)
    elif isinstance(kv, torch.Tensor):
        cache = cache_from_kv(kv, slots=slots)
    else:
        cache = kv.cache(slots, peek=peek)
    # Nothing stale to skip over: the model's own causal mask is exact (and bit-identical
    # to prefix caching). Otherwise the scattered queries need key_pos <= query_pos; probes
    # take that path too (the same function, without a dense mask or repeat_kv).
    scattered, mask = (nullcontext(), None) if slots is None and not peek else _scattered(
        lm, positions, layout.total_len, attention, groups, host_positions)
    layered = nullcontext()
    if plan is not None and not plan.constant:
        if recorder is not None:
            raise ValueError("a probe pass (recorder) can't run a narrowing LayerPlan")
        if lm.model.config._attn_implementation != IMPLEMENTATION:
            raise ValueError(f"a narrowing LayerPlan needs the model on the {IMPLEMENTATION!r} attention "
                             "(runtime.attention.use_kvfuse_attention): it reads the question's attention in the pass")
        layered = LayerNarrowing(lm.model, plan, positions, len(question_ids), cache)
        recorder = layered.recorder
        if narrowing is not None:
            narrowing.append(layered)
    with scattered, layered, record_attention(recorder) if recorder else nullcontext():
        out = lm.model(input_ids=input_ids[None].long(), position_ids=positions[None], **cache_kwargs(lm.model, cache),
                       attention_mask=mask, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1].float()


class _ProbeDone(Exception):
    pass


@contextmanager
def stop_after_layer(model, n_layers: int):
    """Run a forward only through decoder layers 0..n_layers-1 (raises _ProbeDone after them)."""
    layers = model.model.layers
    if n_layers >= len(layers):
        yield
        return

    def stop(*_):
        raise _ProbeDone

    handle = layers[n_layers - 1].register_forward_hook(stop)
    try:
        yield
    except _ProbeDone:
        pass
    finally:
        handle.remove()


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = lm.model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    tok_eos = lm.tokenizer.eos_token_id if lm.tokenizer is not None else None   # random bench models: none
    return {i for i in (tok_eos, *ids) if i is not None}


@dataclass
class Prepared:
    """A fused prompt ready for selection: its `FusedKV` and one `SelectionContext` whose
    lazily computed signals (question attention, layer-1 K/V) every selector and ratio run
    on this prompt shares. per_request: the prompt runs one selector (probes only as deep
    as it reads, device-side selection on CUDA); otherwise probes run every layer, so one
    probe serves every selector."""
    lm: LoadedModel
    source: FusedKV
    question_ids: torch.Tensor       # [Q]
    ctx: SelectionContext
    per_request: bool = False
    on_device: bool = False          # this run's question attention stays on the GPU

    @property
    def layout(self) -> FusedLayout:
        return self.source.layout

    @property
    def kv(self) -> torch.Tensor:
        """[L, 2, H_kv, N, D] re-rotated, N = question_start."""
        return self.source.stored

    @property
    def context_tokens(self) -> torch.Tensor:
        return self.source.context_tokens

    @property
    def assemble_s(self) -> float:
        return sum(self.source.timings.values())


def prepare(lm: LoadedModel, prefix: ChunkData, chunks: list[ChunkData], question_ids: torch.Tensor,
            per_request: bool = False) -> Prepared:
    """Assemble [prefix][chunks] for `question_ids` and wire the selectors' lazy signals."""
    question_ids = torch.as_tensor(question_ids).long()
    return prepare_from(lm, HostKV(lm, prefix, chunks, len(question_ids)), question_ids, per_request)


def prepare_from(lm: LoadedModel, source: FusedKV, question_ids: torch.Tensor, per_request: bool = False) -> Prepared:
    """Wire the selectors' lazy signals over any `FusedKV` (host-assembled or arriving layer-wise).

    The plain question probe runs only `ctx.probe_layers` deep (all when None) over a
    read-only view, waiting for those layers alone; every other signal first makes the
    compute stream wait for the whole load."""
    question_ids = torch.as_tensor(question_ids).long()
    layout = source.layout
    ctx_cols = slice(layout.prefix_len, layout.question_start)
    n_layers = lm.spec.n_layers

    def attend(selected: torch.Tensor) -> torch.Tensor:
        """Question-to-context attention [probe_layers or L, Q, C] from one pass of
        `selected` + Q over the fused cache."""
        depth = ctx.probe_layers
        shallow = selected.numel() == 0 and depth is not None and 0 < depth < n_layers
        rec = AttentionRecorder(layers=set(range(depth)) if shallow else None,
                                query_rows=slice(selected.numel(), None))
        if not shallow:
            source.wait_all()
        p_layout, p_question = probe_view(layout, question_ids)  # at most the last PROBE_QUESTION_TOKENS
        with stop_after_layer(lm.model, depth) if shallow else nullcontext():
            recompute(lm, source, p_layout, source.context_tokens, p_question, selected, rec, peek=True)
        attn = torch.stack([rec.maps[l][:, ctx_cols] for l in sorted(rec.maps)])      # [L', Q, C]
        return attn if prep.on_device else _to_host(attn)

    def repairer(new: torch.Tensor, reduce=None) -> torch.Tensor:
        """Question attention [L, Q, C] from one pass of `new` + Q over the run's working cache,
        into which the pass writes `new`'s fresh K/V (`kvcache.RepairLayer`); on the host.
        reduce: applied where the pass ran, before the copy (e.g. [L, Q, C] -> [C]: on a GPU the
        host then copies and scores 1/(L*Q) of the bytes while the GPU does the sum)."""
        rec = AttentionRecorder(query_rows=slice(new.numel(), None))
        p_layout, p_question = probe_view(layout, question_ids)
        recompute(lm, source, p_layout, source.context_tokens, p_question, new, rec, peek=True,
                  cache_factory=lambda _, slots: source.repair_cache(slots))
        attn = torch.stack([rec.maps[l][:, ctx_cols] for l in sorted(rec.maps)])      # [L, Q, C]
        return _to_host(attn if reduce is None else reduce(attn))

    def recompute_layer(layer: int) -> torch.Tensor:
        source.wait_all()
        return recompute_context_layer(lm, source.stored, layout, source.context_tokens, layer)

    ctx = SelectionContext(layout=layout, kv=source.stored, attend=attend, recompute_layer=recompute_layer,
                           saliency=source.saliency, repairer=repairer if hasattr(source, "repair_cache") else None)
    prep = Prepared(lm, source, question_ids, ctx, per_request)
    return prep


def _to_host(attn: torch.Tensor) -> torch.Tensor:
    """A probe's attention on the host (a no-op off CUDA)."""
    if attn.device.type != "cuda":
        return attn
    host = attn.to("cpu", non_blocking=True)  # into pinned memory: ~10x faster than a pageable copy
    torch.cuda.current_stream(attn.device).synchronize()
    return host


def with_forced(plan: LayerPlan, forced: torch.Tensor) -> LayerPlan:
    """`plan` with the `forced` positions [R] (chunks the cold plan recomputes instead of loading)
    recomputed at every layer: added to the initial set, pinned, and counted in every layer's keep."""
    initial = plan.initial.long().cpu()
    forced = forced.long().cpu()
    new = forced[~torch.isin(forced, initial)]
    old_pinned = torch.empty(0, dtype=torch.long) if plan.pinned is None else plan.pinned.long().cpu()
    extra = int((~torch.isin(forced, old_pinned)).sum())            # newly pinned: each needs a place at every layer
    top = plan.keep[0] + new.numel()
    keep = [top] + [min(top, k + extra) for k in plan.keep[1:]]
    return LayerPlan(torch.cat((initial, new)).sort().values, keep, torch.cat((old_pinned, forced)).unique(),
                     plan.window)


def run(prep: Prepared, selector: str = "kvfuse", ratio: float = 0.15, selected: torch.Tensor | None = None,
        attention: str | None = None, groups: int | None = None) -> FusionResult:
    """Select `ratio` of the context tokens of a prepared prompt and recompute them with the question.

    selected: absolute positions (or a `LayerPlan`) to recompute instead of asking the selector. attention /
    groups: the recompute's attention backend (see `recompute`). Timings (seconds):
    assemble_s or open_s (getting the KV), select_s (with the signals it read, whoever paid
    for them; with the repair passes of an incremental selector, whose share is repair_s),
    recompute_s, total_s. On CUDA, with a selector of DEVICE_SELECTORS the
    selection never leaves the GPU: select_s is then the host's time to queue it, and the
    GPU time shows in recompute_s."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    select = get_selector(selector)
    ctx, lm, source = prep.ctx, prep.lm, prep.source
    cuda = lm.model.device.type == "cuda"
    on_device = (prep.per_request and cuda and selected is None
                 and (selector in DEVICE_SELECTORS or getattr(select, "on_device", False))
                 and not (groups is not None and groups > 1) and attention != "grouped")
    prep.on_device = on_device
    ctx.used.clear()
    ctx.repaired, ctx.repair_s = torch.zeros(0, dtype=torch.long), 0.0
    if hasattr(source, "reset_working"):
        source.reset_working()
    paid_before = sum(ctx.costs.values())
    t0 = time.perf_counter()
    forced = getattr(source, "recompute_positions", None)  # [R] chunks recomputed instead of loaded (coldplan)
    if selected is None:
        depth = probe_depth(selector, lm.spec.n_layers)
        ctx.probe_layers = depth if prep.per_request else None
        if depth == lm.spec.n_layers and getattr(select, "reads_stored", True):
            source.wait_all()  # a selector may read any layer of ctx.kv (its probes and repairs wait per layer)
        budget = round(ratio * prep.layout.context_len)
        selected = select(ctx, budget)
    plan = selected if isinstance(selected, LayerPlan) else None
    if forced is not None and forced.numel():
        selected = with_forced(selected, forced) if plan is not None else \
            torch.cat((selected.long(), forced.to(selected.device))).unique()  # sorted, no repeats
        plan = selected if plan is not None else None
    if plan is None:
        selected = selected.long() if on_device else selected.long().cpu()
    rest = _not_repaired(selected, ctx.repaired)
    t_select = time.perf_counter()
    narrowing: list[LayerNarrowing] = []
    cache, logits = recompute(lm, source, prep.layout, source.context_tokens, prep.question_ids, rest,
                              attention=attention, groups=groups, narrowing=narrowing)
    if cuda:
        torch.cuda.current_stream(lm.model.device).synchronize()
    t_done = time.perf_counter()
    # Signals are shared between runs on one prompt: charge each run what its signals cost,
    # whether it computed them now or found them cached, so timings compare fairly.
    own_select = (t_select - t0) - (sum(ctx.costs.values()) - paid_before)
    select_s = own_select + ctx.signal_seconds()
    got = dict(source.timings)
    initial = plan.initial if plan is not None else selected
    kept = narrowing[0].kept.cpu() if narrowing else (initial.cpu() if plan is not None else None)
    return FusionResult(cache, logits, prep.layout, initial.cpu(), timings={
        **got, "select_s": select_s, "recompute_s": t_done - t_select, "repair_s": ctx.repair_s,
        "total_s": sum(got.values()) + select_s + t_done - t_select,
    }, layer_counts=list(plan.keep) if plan is not None else None, kept=kept)


def _not_repaired(selected, repaired: torch.Tensor):
    """The selected positions the final recompute still runs: those the selection did not
    already repair in the working cache. ValueError when a repaired token is not selected
    (its fresh K/V would be in the cache but not counted) or the selection is a LayerPlan."""
    if not repaired.numel():
        return selected
    if isinstance(selected, LayerPlan):
        raise ValueError("a selector that repairs tokens while selecting must return a fixed set, not a LayerPlan")
    sel = selected.to(repaired.device)
    if not torch.isin(repaired, sel).all():
        raise ValueError("the selector repaired tokens it did not select: return every repaired position")
    return selected[~torch.isin(sel, repaired).to(selected.device)]


def fuse(lm: LoadedModel, prefix: ChunkData, chunks: list[ChunkData], question_ids: torch.Tensor,
         selector: str = "kvfuse", ratio: float = 0.15) -> FusionResult:
    """Fused prefill of [prefix][chunks][question] recomputing `ratio` of the chunk tokens."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    get_selector(selector)  # fail before any work
    return run(prepare(lm, prefix, chunks, question_ids, per_request=True), selector, ratio)


@torch.inference_mode()
def recompute_context_layer(lm: LoadedModel, kv: torch.Tensor, layout: FusedLayout, context_tokens: torch.Tensor,
                            layer: int) -> torch.Tensor:
    """Fresh K/V [2, H_kv, C, D] of every context token at `layer`, with the full context
    (layers 0..layer are run over all C tokens; the layers above are skipped)."""
    device = lm.model.device
    positions = layout.context_positions().to(device)                                 # [C]
    cache = cache_from_kv(kv[:layer + 1].to(device), slots=positions)
    scattered, mask = _scattered(lm, positions, layout.question_start, None, None)
    with scattered, stop_after_layer(lm.model, layer + 1):
        lm.model.model(input_ids=context_tokens.to(device)[None], position_ids=positions[None],
                       **cache_kwargs(lm.model.model, cache), attention_mask=mask, use_cache=True)
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
