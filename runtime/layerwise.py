"""Layer-wise loading overlapped with the selective recompute (DESIGN §5).

    tiers = tiers_for(store, lm.spec, host_bytes=16 << 30, gpu_bytes=8 << 30, device="cuda")
    tiers.submit("req-1", [prefix_id, *chunk_ids])   # prefetch disk -> pinned starts now
    result = fuse_layerwise(lm, tiers, "req-1", question_ids, selector="a3", ratio=0.15)

The tiers (`kvfuse.loader.tiers.Tiers`: shard files -> pinned host pool -> GPU
pool) give every chunk of a request a GPU slot; warm and cold chunks come with
the pinned entry to copy from. `LayerwiseLoad` (here) moves them, and is the
`FusedKV` the fusion driver (`fusion.prepare_from` / `fusion.run`) reads: the
selection and the recompute are the driver's, the same code as the host path.

Per layer l, on a side CUDA stream: copy each warm/cold chunk's layer l pinned
-> its GPU slot (one copy per chunk and layer, 2 MiB for Llama-3-8B); on a
second side stream, once those copies are done: gather all chunks' layer l into
the fused buffer [L, 2, H_kv, N + Q, D] at their new positions (a quantised
store's fp8/int8 codes are converted by the gather's copy and scaled in place
right after it: `quant.dequantize_`, before the rotation), re-rotate the
keys by each token's position delta on the GPU (cos/sin tables made once per
request), and record event l. (Two streams, so the copy engine never waits for
the gather kernels.) The cache layers of the model (`kvcache.StreamedLayer`)
make the compute stream wait on event l inside their `update()`, so layer l is
computed as soon as it has landed while layer l+1 copies; the host never waits
inside the layer loop. Copies are issued `depth` layers ahead of the compute
from the layer hooks, so the host's cost of issuing them is spread over the
recompute instead of delaying its start.

The question probe (selectors that read question-to-context attention) runs
only as deep as the selector reads (`a3`: layers 0..1), so the selection and
the recompute start before the deeper layers have arrived.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from transformers.cache_utils import DynamicCache

from kvfuse.loader.pool import PoolEntry
from kvfuse.loader.quant import dequantize_, scale_index
from kvfuse.loader.store import Store
from kvfuse.loader.tiers import Tiers

from .fusion import FusionResult, prepare_from, probe_depth, run
from .kvcache import StreamedLayer, cache_from_kv
from .layout import FusedLayout
from .model import LoadedModel, ModelSpec
from .recompute_attention import plan_query_groups
from .rope import rotate_keys_, rotation_table

__all__ = ["LayerwiseLoad", "Tiers", "fuse_layerwise", "open_load", "plan_query_groups", "probe_depth", "tiers_for"]


def tiers_for(store: Store, spec: ModelSpec, host_bytes: int, gpu_bytes: int, **kwargs) -> Tiers:
    """`Tiers` sized for a model's KV geometry (kwargs: device, chunk_tokens, policy, workers, ...)."""
    return Tiers(store, (spec.n_layers, spec.n_kv_heads, spec.head_dim), spec.dtype, host_bytes, gpu_bytes, **kwargs)


def open_load(tiers: Tiers, request_id: str, n_question: int, inv_freq: torch.Tensor, depth: int = 4,
              measure_stall: bool = False, first: int = 1) -> "LayerwiseLoad":
    """Resolve the request's chunks to GPU slots (hot) or pinned entries (warm/cold, waiting
    for disk reads) and start the layer-wise copies of layers 0..first-1."""
    pairs, counts = tiers.acquire(request_id)
    return LayerwiseLoad(tiers, request_id, pairs, n_question, inv_freq, depth, measure_stall, counts, first)


class LayerwiseLoad:
    """One request's fused KV, arriving layer by layer on the side streams (a `fusion.FusedKV`)."""

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
        self.fused = torch.empty((L, 2, H, N + n_question, D), dtype=tiers.dtype, device=device)  # model dtype
        self.starts = (0, *self.layout.chunk_starts)
        # [C] float32: how far each context token moves (new start - stored pos_base)
        shifts = [float(s - g.meta["pos_base"]) for g, s in zip(chunks, self.layout.chunk_starts)]
        delta = torch.repeat_interleave(torch.tensor(shifts, device=device),
                                        torch.tensor(self.layout.chunk_lens, device=device),
                                        output_size=self.layout.context_len)
        self.cos, self.sin = rotation_table(delta, inv_freq)                     # [C, D] float32 each
        self.context = slice(P, N)
        metas = [g.meta for g in chunks]
        self.context_tokens = torch.cat([m["tokens"].long() for m in metas])     # [C]
        self.saliency = torch.cat([m["saliency"] for m in metas], dim=-1)        # [S_sig, C]
        self.timings: dict = {}
        self.n_layers = L
        self.issued = 0
        self.quantised = tiers.codec.quantised  # pools hold codes [L, 2, H_kv, T, D] + scales [L, H_kv, D + T]
        if self.quantised:  # k [N, D], v [N]: each stored token's scales in the chunks' scale rows laid end to end
            self.scale_index = scale_index([g.n_tokens for g, _ in pairs], D, device)
        self.h2d_bytes = sum(h.nbytes for _, h in pairs if h is not None)
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
                if self.quantised:  # + the codes' scales of layer l, [H_kv, D + T] each
                    moves += [(g.scales[l], h.scales[l]) for g, h in self.pairs if h is not None]
                if moves:
                    torch._foreach_copy_([d for d, _ in moves], [s for _, s in moves], non_blocking=True)
                if cuda:
                    self.h2d_events[l].record(self.h2d)
            with torch.cuda.stream(self.stream) if cuda else nullcontext():
                if cuda:
                    self.stream.wait_event(self.h2d_events[l])
                dst = [self.fused[l, :, :, s:s + g.n_tokens] for (g, _), s in zip(self.pairs, self.starts)]
                torch._foreach_copy_(dst, [g.kv[l] for g, _ in self.pairs])   # [2, H_kv, T, D] each
                if self.quantised:  # codes -> KV in place, before the rotation (scales: per stored channel)
                    scales = torch.cat([g.scales[l] for g, _ in self.pairs], dim=1)  # [H_kv, sum (D + T_i)]
                    dequantize_(self.fused[l, :, :, : self.layout.question_start], scales, *self.scale_index)
                rotate_keys_(self.fused[l, 0, :, self.context], self.cos, self.sin)  # [H_kv, C, D]
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
    def cache(self, slots: torch.Tensor | None = None, peek: bool = False) -> DynamicCache:
        """A cache whose layer l waits for layer l's copy; the recompute writes into the fused
        buffer itself. peek: a probe's cache (read-only view, or with `slots` a copy)."""
        if peek and slots is not None:  # a probe that recomputes some tokens must not touch `fused`
            self.wait_all()
            return cache_from_kv(self.stored, slots=slots)
        cache = DynamicCache()
        cache.layers = [StreamedLayer(self, l, peek) for l in range(self.n_layers)]
        for layer in cache.layers:
            layer.slots = slots
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
        self.tiers.release(self.request_id, self.pairs)
        self.pairs = []
        return out


def fuse_layerwise(lm: LoadedModel, tiers: Tiers, request_id: str, question_ids: torch.Tensor,
                   selector: str = "a3", ratio: float = 0.15, selected: torch.Tensor | None = None,
                   depth: int = 4, measure_stall: bool = False, groups: int | None = None,
                   attention: str | None = None) -> FusionResult:
    """Fused prefill of a queued request ([prefix, *chunks]) with layer-wise loading.

    The fusion driver (`fusion.run`) over a `LayerwiseLoad`: same result as `fusion.fuse`
    over the same chunks (the selection may be given as `selected`, absolute positions, to
    skip the selector). Timings: open_s (tier lookup and disk waits), select_s,
    recompute_s, total_s; counts hot/warm/cold; stall_ms and copy_ms with measure_stall.
    attention / groups: the recompute's attention backend (`recompute_attention`; default
    per device; groups > 1 selects `grouped` with that many query groups).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    t0 = time.perf_counter()
    question_ids = torch.as_tensor(question_ids).long()
    n_probe = probe_depth(selector, lm.spec.n_layers) if selected is None else 0
    load = open_load(tiers, request_id, len(question_ids), lm.rope_inv_freq(), depth, measure_stall, first=n_probe)
    load.timings["open_s"] = time.perf_counter() - t0
    try:
        prep = prepare_from(lm, load, question_ids, per_request=True)
        result = run(prep, selector, ratio, selected=selected, attention=attention, groups=groups)
    finally:
        copy = load.close()
    result.timings.update(copy)
    return result
