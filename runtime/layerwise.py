"""Layer-wise loading overlapped with the selective recompute (DESIGN §5).

    tiers = Tiers(store, spec, host_bytes=16 << 30, gpu_bytes=8 << 30, device="cuda")
    tiers.submit("req-1", [prefix_id, *chunk_ids])   # prefetch disk -> pinned starts now
    result = fuse_layerwise(lm, tiers, "req-1", question_ids, selector="a3", ratio=0.15)

Tiers: shard files (read with pread, never mmap -> GPU) -> a pinned host pool ->
a GPU pool. A chunk found in the GPU pool is *hot*, in the pinned pool *warm*,
otherwise *cold* (read from disk first). Every chunk of a request gets a GPU
slot; warm and cold chunks are copied into it layer by layer.

Per layer l, on a side CUDA stream: copy each warm/cold chunk's layer l pinned
-> its GPU slot (one copy per chunk and layer, 2 MiB for Llama-3-8B); on a
second side stream, once those copies are done: gather all chunks' layer l into
the fused buffer [L, 2, H_kv, N + Q, D] at their new positions, re-rotate the
keys by each token's position delta on the GPU, and record event l. (Two
streams, so the copy engine never waits for the gather kernels.) The cache layers of the model
(`StreamedLayer`) make the compute stream wait on event l inside their
`update()`, so layer l is computed as soon as it has landed while layer l+1
copies; the host never waits inside the layer loop. Copies are issued `depth`
layers ahead of the compute from the layer hooks, so the host's cost of issuing
them is spread over the recompute instead of delaying its start.

The question probe (selectors that read question-to-context attention) runs
only as deep as the selector reads (`a3`: layers 0..1), so the selection and
the recompute start before the deeper layers have arrived.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import fields

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvfuse.loader.pool import KVPool, PoolEntry
from kvfuse.loader.prefetch import Prefetcher
from kvfuse.loader.store import Store

from . import attention
from .attention import AttentionRecorder
from .fusion import FusionResult, recompute
from .guards import probe_view
from .kvcache import ScatterLayer
from .layout import FusedLayout
from .model import LoadedModel, ModelSpec
from .rope import rerotate_keys
from .selectors import SelectionContext, get_selector

# How many layers (from 0) a selector's question probe reads (0: no probe); others probe every layer.
PROBE_LAYERS = {"a3": 2, "epic": 0, "reuse": 0, "full": 0}
# Selectors that score on device tensors as they are: their selection stays on the GPU, so the
# host queues the recompute right behind the probe instead of waiting for the probe's result.
DEVICE_SELECTORS = {"a3"}
# Below this many recomputed rows, one attention call per layer beats query groups: a group
# plan needs the selection on the host (a sync) and 8 calls a layer cost launch time.
GROUP_MIN_ROWS = 3072


class Tiers:
    """Shard files -> pinned host pool -> GPU pool, with queue-driven prefetch into the pinned pool."""

    def __init__(self, store: Store, spec: ModelSpec, host_bytes: int, gpu_bytes: int,
                 device: str | torch.device = "cuda", chunk_tokens: int = 512, policy: str = "lookahead",
                 workers: int = 8, verify: bool = False, drop_page_cache: bool = False):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        slot = (spec.n_layers, 2, spec.n_kv_heads, chunk_tokens, spec.head_dim)
        self.host = KVPool("pinned host", host_bytes, slot, spec.dtype, "cpu", pin=cuda, policy=policy)
        self.gpu = KVPool("GPU", gpu_bytes, slot, spec.dtype, self.device, policy=policy)
        self.prefetcher = Prefetcher(store, self.host, workers=workers, verify=verify,
                                     drop_page_cache=drop_page_cache)
        self.queue = self.prefetcher.queue
        # Side streams shared by every load, so the work of consecutive requests stays in order:
        # host -> GPU transfers on one, gather + re-rotation on the other.
        self.h2d_stream = torch.cuda.Stream(self.device) if cuda else None
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None

    def submit(self, request_id: str, chunk_ids) -> None:
        """Enqueue a request ([prefix, *chunks]); its cold chunks start moving to pinned memory."""
        self.prefetcher.submit(request_id, chunk_ids)

    def cancel(self, request_id: str) -> None:
        self.prefetcher.cancel(request_id)

    def open(self, request_id: str, n_question: int, inv_freq: torch.Tensor, depth: int = 4,
             measure_stall: bool = False, first: int = 1) -> "LayerwiseLoad":
        """Resolve the request's chunks to GPU slots (hot) or pinned entries (warm/cold, waiting
        for disk reads) and start the layer-wise copies."""
        chunk_ids = list(self.queue.chunks(request_id) or ())
        if not chunk_ids:
            raise KeyError(f"request {request_id!r} is not queued; submit() it first")
        self.gpu.check_fits(len(chunk_ids), f"request {request_id}")
        self.host.check_fits(len(chunk_ids), f"request {request_id}")
        rank = self.queue.position(request_id)
        gpu: list[PoolEntry | None] = [self.gpu.get(cid) for cid in chunk_ids]
        missing = [cid for cid, g in zip(chunk_ids, gpu) if g is None]
        host: dict[str, PoolEntry] = {}
        try:
            counts = {"hot": len(chunk_ids) - len(missing), "warm": 0, "cold": 0}
            host = dict(zip(missing, self.prefetcher.acquire(request_id, only=missing, counts=counts)))
            next_use = self.queue.next_use()
            for i, cid in enumerate(chunk_ids):
                if gpu[i] is None:
                    h = host[cid]
                    gpu[i] = self.gpu.allocate(cid, h.n_tokens, rank, next_use)
                    gpu[i].meta = h.meta
                    self.gpu.mark_ready(gpu[i])  # filled on the copy stream; every user waits on it
        except BaseException:
            for e in [g for g in gpu if g is not None]:
                self.gpu.release(e)
            for e in host.values():
                self.host.release(e)
            raise
        pairs = [(g, host.get(cid)) for cid, g in zip(chunk_ids, gpu)]
        return LayerwiseLoad(self, request_id, pairs, n_question, inv_freq, depth, measure_stall, counts, first)

    def close(self) -> None:
        self.prefetcher.close()


class LayerwiseLoad:
    """One request's fused KV, arriving layer by layer on the side streams."""

    def __init__(self, tiers: Tiers, request_id: str, pairs: list[tuple[PoolEntry, PoolEntry | None]],
                 n_question: int, inv_freq: torch.Tensor, depth: int, measure_stall: bool, counts: dict,
                 first: int = 1):
        self.tiers, self.request_id, self.pairs, self.depth = tiers, request_id, pairs, depth
        self.counts = counts
        prefix, chunks = pairs[0][0], [g for g, _ in pairs[1:]]
        self.layout = FusedLayout(prefix_len=prefix.n_tokens, chunk_ids=tuple(g.chunk_id for g in chunks),
                                  chunk_lens=tuple(g.n_tokens for g in chunks), question_len=n_question)
        device = tiers.device
        L, _, H, _, D = tiers.gpu.slot_shape
        P, N = self.layout.prefix_len, self.layout.question_start
        # [L, 2, H_kv, N + Q, D]: stored K/V at 0..N-1; the question's fresh K/V land in the tail
        self.fused = torch.empty((L, 2, H, N + n_question, D), dtype=tiers.gpu.dtype, device=device)
        self.starts = (0, *self.layout.chunk_starts)
        # [C] float32: how far each context token moves (new start - stored pos_base)
        shifts = [float(s - g.meta["pos_base"]) for g, s in zip(chunks, self.layout.chunk_starts)]
        self.delta = torch.repeat_interleave(torch.tensor(shifts, device=device),
                                             torch.tensor(self.layout.chunk_lens, device=device),
                                             output_size=self.layout.context_len)
        self.context = slice(P, N)
        self.inv_freq = inv_freq.to(device, torch.float32)
        self.n_layers = L
        self.issued = 0
        self.h2d_bytes = sum(h.kv[0].numel() * h.kv.element_size() * L for _, h in pairs if h is not None)
        self.h2d, self.stream = tiers.h2d_stream, tiers.copy_stream
        cuda = self.stream is not None
        timing = measure_stall and cuda
        # h2d_events[l]: layer l's pinned -> GPU-slot copies are done; events[l]: layer l is in `fused`
        self.h2d_events = [torch.cuda.Event(enable_timing=timing) for _ in range(L)] if cuda else []
        self.events = [torch.cuda.Event(enable_timing=timing) for _ in range(L)] if cuda else []
        self.stall_marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = [] if timing else None
        if cuda:
            compute = torch.cuda.current_stream(device)
            self.t_start = torch.cuda.Event(enable_timing=True)
            for stream in (self.h2d, self.stream):
                stream.wait_stream(compute)  # fused was allocated on the compute stream
                self.fused.record_stream(stream)
            self.t_start.record(self.h2d)
        self.issue(max(1, first))

    # ---- the side streams ----------------------------------------------------------
    def issue(self, upto: int) -> None:
        """Queue the work of layers [issued, upto) on the side streams (returns at once):
        pinned -> GPU slot on the copy engine's stream, then gather + re-rotation on the other."""
        upto = min(upto, self.n_layers)
        cuda = self.stream is not None
        for l in range(self.issued, upto):
            with torch.cuda.stream(self.h2d) if cuda else nullcontext():
                moves = [(g.kv[l], h.kv[l]) for g, h in self.pairs if h is not None]  # warm/cold: pinned -> slot
                if moves:
                    torch._foreach_copy_([d for d, _ in moves], [s for _, s in moves], non_blocking=True)
                if cuda:
                    self.h2d_events[l].record(self.h2d)
            with torch.cuda.stream(self.stream) if cuda else nullcontext():
                if cuda:
                    self.stream.wait_event(self.h2d_events[l])
                dst = [self.fused[l, :, :, s:s + g.n_tokens] for (g, _), s in zip(self.pairs, self.starts)]
                torch._foreach_copy_(dst, [g.kv[l] for g, _ in self.pairs])   # [2, H_kv, T, D] each
                keys = self.fused[l, 0, :, self.context]                        # [H_kv, C, D]
                keys.copy_(rerotate_keys(keys, self.delta, self.inv_freq))
                if cuda:
                    self.events[l].record(self.stream)
        self.issued = max(self.issued, upto)

    @property
    def stored(self) -> torch.Tensor:
        """[L, 2, H_kv, N, D]: the fused stored K/V (without the question's tail)."""
        return self.fused[:, :, :, : self.layout.question_start]

    def issue_all(self) -> None:
        self.issue(self.n_layers)

    def wait_all(self) -> None:
        """Make the compute stream wait for every layer (the events complete in order)."""
        self.issue_all()
        if self.stream is not None:
            torch.cuda.current_stream(self.fused.device).wait_event(self.events[-1])

    def wait(self, layer: int, ahead: int | None = None) -> None:
        """Called on the compute stream before layer `layer` reads its K/V: no host sync.

        Queues this layer if it isn't yet, and at most two more, up to `ahead` (default:
        depth) layers past it: the host's issuing cost is spread over the layer loop instead
        of delaying the launch of the layer the GPU waits for."""
        self.issue(max(layer + 1, min(layer + 1 + (self.depth if ahead is None else ahead), self.issued + 2)))
        if self.stream is None:
            return
        compute = torch.cuda.current_stream(self.fused.device)
        if self.stall_marks is None:
            compute.wait_event(self.events[layer])
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(compute)
        compute.wait_event(self.events[layer])
        b.record(compute)
        self.stall_marks.append((a, b))

    # ---- caches over the fused buffer ----------------------------------------------
    def cache(self, peek: bool = False) -> DynamicCache:
        """A cache whose layer l waits for layer l's copy. peek: the probe's read-only view."""
        cache = DynamicCache()
        cache.layers = [StreamedLayer(self, l, peek) for l in range(self.n_layers)]
        return cache

    def close(self) -> dict:
        """Wait for the side streams, release the pool entries; returns copy and stall timings."""
        out = {"h2d_bytes": self.h2d_bytes, **self.counts}
        if self.stream is not None:
            self.issue_all()
            self.events[-1].synchronize()
            if self.stall_marks is not None:
                out["stall_ms"] = sum(a.elapsed_time(b) for a, b in self.stall_marks)
                out["copy_ms"] = self.t_start.elapsed_time(self.events[-1])     # copies + gather + rotation
                out["h2d_ms"] = self.t_start.elapsed_time(self.h2d_events[-1])  # host -> GPU transfers alone
        for g, h in self.pairs:
            self.tiers.gpu.release(g)
            if h is not None:
                self.tiers.host.release(h)
        self.tiers.prefetcher.finish(self.request_id)
        self.pairs = []
        return out


class StreamedLayer(ScatterLayer):
    """A cache layer over fused[l] that makes the compute stream wait for layer l's copy.

    The recompute pass writes the selected tokens' fresh K/V into their slots and the
    question's into the fused buffer's tail (no concatenation); later updates append."""

    def __init__(self, load: LayerwiseLoad, idx: int, peek: bool):
        n = load.layout.question_start
        self.tail = (load.fused[idx, 0][None], load.fused[idx, 1][None])         # [1, H_kv, N + Q, D]
        super().__init__(self.tail[0][:, :, :n], self.tail[1][:, :, :n])         # [1, H_kv, N, D] views
        self.load, self.idx, self.peek = load, idx, peek

    def update(self, key_states, value_states, *args, **kwargs):
        if self.load is not None:
            self.load.wait(self.idx, ahead=0 if self.peek else None)
        if self.peek:  # the probe: attend over the stored K/V plus the question, keep nothing
            return torch.cat((self.keys, key_states), -2), torch.cat((self.values, value_states), -2)
        self.load = None  # landed; later updates (decoding) append as usual
        s = 0 if self.slots is None else self.slots.numel()
        n = self.keys.shape[-2]
        full_k, full_v = self.tail
        if self.tail[0] is None or n + key_states.shape[-2] - s != full_k.shape[-2]:
            return super().update(key_states, value_states, *args, **kwargs)
        if s:  # key_states: [1, H_kv, S + Q, D]; the first S are the selected context tokens
            self.keys.index_copy_(2, self.slots, key_states[:, :, :s])
            self.values.index_copy_(2, self.slots, value_states[:, :, :s])
        full_k[:, :, n:] = key_states[:, :, s:]
        full_v[:, :, n:] = value_states[:, :, s:]
        self.keys, self.values, self.slots, self.tail = full_k, full_v, None, (None, None)
        return self.keys, self.values


# ---- grouped attention for the recompute ---------------------------------------------
#
# The recomputed queries sit at scattered positions and see keys at positions <= their
# own, so a query early in the context needs only a prefix of the keys. SDPA with the
# float mask computes every (query, key) pair; splitting the queries into groups by
# position and giving each group only the keys up to its last position skips the
# fully masked part (with G equal groups, about (G + 1) / 2G of the work).
# Mathematically the same attention: the skipped keys have weight exp(-inf) = 0.

GROUPED = "kvfuse-grouped"
_plan: list[tuple[int, int, int]] | None = None   # (first row, end row, keys) per query group


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """`kvfuse` attention, except inside `query_groups(...)`: one SDPA call per query group."""
    plan = _plan
    if (plan is None or attention._active is not None or attention_mask is None or attention_mask.dim() != 4
            or query.shape[2] != plan[-1][1]):
        return attention.kvfuse_attention(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)          # [1, H_q, K, D]
    out = torch.empty_like(query)                                         # [1, H_q, S + Q, D]
    for a, b, k in plan:
        out[:, :, a:b] = F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, :k], value[:, :, :k], attn_mask=attention_mask[:, :, a:b, :k], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED, grouped_attention)
AttentionMaskInterface.register(GROUPED, sdpa_mask)


def plan_query_groups(positions: torch.Tensor, n_keys: int, groups: int, align: int = 64) -> list[tuple[int, int, int]]:
    """Split rows [0, len(positions)) into `groups` runs; each attends keys [0, its max position]."""
    rows = len(positions)
    bounds = torch.linspace(0, rows, groups + 1).round().long().tolist()
    plan = []
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            last = int(positions[a:b].max()) + 1
            plan.append((a, b, min(n_keys, -(-last // align) * align)))
    return plan


@contextmanager
def query_groups(plan: list[tuple[int, int, int]] | None):
    global _plan
    previous, _plan = _plan, plan
    try:
        yield
    finally:
        _plan = previous


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


def probe_depth(selector: str, n_layers: int) -> int:
    fn = get_selector(selector)
    depth = PROBE_LAYERS[selector] if selector in PROBE_LAYERS else getattr(fn, "probe_layers", None)
    return n_layers if depth is None else min(n_layers, depth)


def _selection_context(lm: LoadedModel, load: LayerwiseLoad, context_tokens: torch.Tensor,
                       question_ids: torch.Tensor, saliency: torch.Tensor, n_probe: int,
                       on_device: bool = False) -> SelectionContext:
    """The selectors' context over a load still in flight.

    The plain question probe runs only `n_probe` layers deep over a read-only view
    (it waits for those layers alone). Every other signal first makes the compute
    stream wait for the whole load, then reads the fused buffer as `fusion` does.
    """
    layout = load.layout
    ctx_cols = slice(layout.prefix_len, layout.question_start)

    def attend(selected: torch.Tensor) -> torch.Tensor:
        """Question-to-context attention [n_probe or L, Q, C]."""
        p_layout, p_question = probe_view(layout, question_ids)  # at most the last PROBE_QUESTION_TOKENS
        shallow = selected.numel() == 0 and 0 < n_probe < lm.spec.n_layers
        rec = AttentionRecorder(layers=set(range(n_probe)) if shallow else None,
                                query_rows=slice(selected.numel(), None))
        if shallow:
            with stop_after_layer(lm.model, n_probe):
                recompute(lm, None, p_layout, context_tokens, p_question, selected, rec,
                          cache_factory=lambda kv, slots: load.cache(peek=True))
        else:
            load.wait_all()
            recompute(lm, load.stored, p_layout, context_tokens, p_question, selected, rec)
        attn = torch.stack([rec.maps[l][:, ctx_cols] for l in sorted(rec.maps)])
        if attn.device.type != "cuda" or on_device:
            return attn
        host = attn.to("cpu", non_blocking=True)  # into pinned memory: ~10x faster than a pageable copy
        torch.cuda.current_stream(attn.device).synchronize()
        return host

    def recompute_layer(layer: int) -> torch.Tensor:
        from . import fusion
        load.wait_all()
        return fusion.recompute_context_layer(lm, load.stored, layout, context_tokens, layer)

    given = {"layout": layout, "kv": load.stored, "attend": attend, "recompute_layer": recompute_layer,
             "saliency": saliency}
    names = {f.name for f in fields(SelectionContext)}
    return SelectionContext(**{k: v for k, v in given.items() if k in names})


def fuse_layerwise(lm: LoadedModel, tiers: Tiers, request_id: str, question_ids: torch.Tensor,
                   selector: str = "a3", ratio: float = 0.15, selected: torch.Tensor | None = None,
                   depth: int = 4, measure_stall: bool = False, groups: int | None = None) -> FusionResult:
    """Fused prefill of a queued request ([prefix, *chunks]) with layer-wise loading.

    Same result as `fusion.fuse` over the same chunks (the selection may be given as
    `selected`, absolute positions, to skip the selector). Timings: open_s (tier lookup and
    disk waits), select_s, recompute_s, total_s; counts hot/warm/cold; stall_ms and copy_ms
    with measure_stall. `groups`: query groups of the recompute's attention (None: one per
    512 recomputed rows, at most 4, from GROUP_MIN_ROWS rows on; 1: a single SDPA call). The
    model's attention becomes `kvfuse-grouped`, which is `kvfuse` outside the recompute.
    With a selector of DEVICE_SELECTORS and no query groups, the selection never leaves the
    GPU: select_s is then the host's time to queue it, and the GPU time shows in recompute_s.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    select = get_selector(selector)
    cuda = tiers.device.type == "cuda"
    t0 = time.perf_counter()
    question_ids = torch.as_tensor(question_ids).long()
    n_probe = probe_depth(selector, lm.spec.n_layers) if selected is None else 0
    load = tiers.open(request_id, len(question_ids), lm.rope_inv_freq(), depth, measure_stall, first=n_probe)
    t_open = time.perf_counter()
    try:
        layout = load.layout
        rows = (round(ratio * layout.context_len) if selected is None else len(selected)) + len(question_ids)
        n_groups = groups if groups is not None else (min(4, rows // 512) if rows >= GROUP_MIN_ROWS else 1)
        on_device = cuda and selected is None and selector in DEVICE_SELECTORS and n_groups == 1
        metas = [g.meta for g, _ in load.pairs[1:]]
        context_tokens = torch.cat([m["tokens"].long() for m in metas])             # [C]
        if selected is None:
            saliency = torch.cat([m["saliency"] for m in metas], dim=-1)            # [S, C]
            if n_probe == lm.spec.n_layers:
                load.wait_all()  # an unknown selector may read any layer of ctx.kv
            ctx = _selection_context(lm, load, context_tokens, question_ids, saliency, n_probe, on_device)
            selected = select(ctx, round(ratio * layout.context_len))
        selected = selected.long() if on_device else selected.long().cpu()
        t_select = time.perf_counter()

        def streamed(kv, slots):
            cache = load.cache()
            for layer in cache.layers:
                layer.slots = slots
            return cache

        plan = None
        if n_groups > 1 and len(selected):
            positions = torch.cat((selected, torch.arange(layout.question_start, layout.total_len)))  # [S + Q]
            plan = plan_query_groups(positions, layout.total_len, n_groups)
        if plan is not None and lm.model.config._attn_implementation != GROUPED:
            lm.model.set_attn_implementation(GROUPED)
        with query_groups(plan):
            cache, logits = recompute(lm, None, layout, context_tokens, question_ids, selected,
                                      cache_factory=streamed)
        if cuda:
            torch.cuda.current_stream(tiers.device).synchronize()
        t_done = time.perf_counter()
        selected = selected.cpu()
    finally:
        copy = load.close()
    return FusionResult(cache, logits, layout, selected, timings={
        "open_s": t_open - t0, "select_s": t_select - t_open, "recompute_s": t_done - t_select,
        "total_s": t_done - t0, **copy,
    })
