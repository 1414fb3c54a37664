"""Layer-wise loading overlapped with the selective recompute (DESIGN §5).

    tiers = tiers_for(store, lm.spec, host_bytes=16 << 30, gpu_bytes=8 << 30, device="cuda")
    tiers.submit("req-1", [prefix_id, *chunk_ids])   # prefetch disk -> pinned starts now
    result = fuse_layerwise(lm, tiers, "req-1", question_ids, selector="a3", ratio=0.15)

The tiers (`kvfuse.loader.tiers.Tiers`: shard files -> pinned host pool -> GPU
pool) give every chunk of a request a GPU slot; warm and cold chunks come with
the pinned entry to copy from. `LayerwiseLoad` (here) moves them, and is the
`FusedKV` the fusion driver (`fusion.prepare_from` / `fusion.run`) reads: the
selection and the recompute are the driver's, the same code as the host path.

Per layer group (`layer_groups`: layers 0 | 1 | 2-3 | 4-7 | 8-15 | ..., at most
`MAX_GROUP` layers), on a side CUDA stream: copy each warm/cold chunk's layers of
the group pinned -> its GPU slot (one copy per chunk and group: a chunk's layers
are adjacent in its slot, so a group is one contiguous range; issue 11 item 4:
one copy per chunk and layer, 1 MiB for Qwen2.5-7B, is bound by the cost of
issuing it, at 42-61% of the pinned ceiling; `kvfuse.bench.copy_ceiling` compares
the designs). Every group's copies are queued as soon as the first layers' work is
(a few hundred copies, 2-5 ms of host time at 16k-32k), so the copy engine never
waits for the host issuing gathers. Per layer l, on a
second side stream, once its group's copies are done: gather all chunks' layer l into
the fused buffer [L, 2, H_kv, N + Q, D] at their new positions (a quantised
store's fp8/int8 codes, and their scales, travel as they are stored; the gather's
copy converts the codes and `quant.dequantize_` scales them in place right after
it, before the rotation: three broadcast kernels per run of equal-length chunks, no
per-token scale tensor; a run's scale rows are stacked once per layer group), re-rotate the
keys by each token's position delta on the GPU (cos/sin tables made once per
request), and record event l. (Two streams, so the copy engine never waits for
the gather kernels.) The cache layers of the model (`kvcache.StreamedLayer`)
make the compute stream wait on event l inside their `update()`, so layer l is
computed as soon as it has landed while layer l+1 copies; the host never waits
inside the layer loop. Gathers are issued `depth` layers ahead of the compute
from the layer hooks, so the host's cost of issuing them is spread over the
recompute instead of delaying its start.

The question probe (selectors that read question-to-context attention) runs
only as deep as the selector reads (`a3`: layers 0..1), so the selection and
the recompute start before the deeper layers have arrived.

Chunks in no pool (with `rates`, `fuse_layerwise` asks the cold-load plan,
`coldplan.plan_cold`): the prefix and the first k chunks are prefilled from their
tokens on the GPU (`prefill_front`) while the others are read from disk, and
their fresh K/V become the prefix entry of the load over the rest; with every
chunk recomputed it is the full prefill (`prefill_over_prefix`). Chunks given as
`recompute=` have no slot (`Tiers.acquire(..., recompute=...)`): their span of the
fused buffer is zeroed and `recompute_positions` lists their tokens, which the
driver adds to the selection, so every layer's K/V of those tokens is computed fresh.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import nullcontext
from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache

from kvfuse.loader.pool import PoolEntry
from kvfuse.loader.quant import dequantize_
from kvfuse.loader.store import Store
from kvfuse.loader.tiers import Tiers

from . import shape_buckets
from .coldplan import ChunkLoad, ColdPlan, LoadRates, plan_cold
from .fusion import FusionResult, full_prefill, prepare_from, probe_depth, run
from .fusion import recompute as recompute_pass
from .guards import fused_tokens
from .kvcache import RepairLayer, StreamedLayer, cache_from_kv, kv_from_cache
from .layout import FusedLayout
from .model import LoadedModel, ModelSpec
from .recompute_attention import plan_query_groups
from .gather_kernel import host_to_device
from .rope import rotate_keys_, rotation_table

__all__ = ["LayerwiseLoad", "Tiers", "fuse_layerwise", "layer_groups", "open_load", "plan_query_groups", "probe_depth",
           "tiers_for"]

# The gather as one Triton kernel per layer (`gather_kernel.GatherPlan`): True to use it where it can
# run (on the CPU only under Triton's interpreter, for the tests), None = on CUDA streams (the
# default), False = never (the torch gather). Environment KVFUSE_GATHER_KERNEL: "1"/"on" (True),
# "0"/"off" (False), unset or "auto" (None). Measured on the H200 (docs/loader.md): the host's queueing of a
# warm 16k request 8.3 -> 4.3 ms (bf16) and 30.3 -> 7.8 ms (fp8), the gather's GPU time 44.9 ->
# 41.8 and 36.5 -> 23.3 ms; its CUDA test matches the torch gather.
def _gather_kernel_setting(value: str) -> bool | None:
    """KVFUSE_GATHER_KERNEL's value -> GATHER_KERNEL; an unknown value warns and means "auto"."""
    choices = {"1": True, "on": True, "true": True, "0": False, "off": False, "false": False, "auto": None}
    if value.strip().lower() not in choices:
        warnings.warn(f"KVFUSE_GATHER_KERNEL={value!r} is not one of 0, 1, auto (or off, on): using auto",
                      stacklevel=2)
    return choices.get(value.strip().lower())


GATHER_KERNEL: bool | None = _gather_kernel_setting(os.environ.get("KVFUSE_GATHER_KERNEL", "auto"))
MAX_GROUP = 8   # layers per host -> GPU copy at most (8 MiB for Llama-3-8B, 8 of its 32 layers)
LEARN_DISK_BYTES = 256 << 20   # a request's disk wait teaches the plan's disk rate from this many bytes up


def layer_groups(n_layers: int, max_group: int = MAX_GROUP) -> list[tuple[int, int]]:
    """[(first, end)] layer ranges copied together: 1, 1, 2, 4, ... layers, at most max_group.

    The first layers arrive one by one (the probe and the recompute start on them), the
    later ones in larger copies: the compute reaches layer l long after the copy engine
    has moved layers < 2l, so the larger units cost no stall and need far fewer copies."""
    out, start, size = [], 0, 1
    while start < n_layers:
        end = min(n_layers, start + size)
        out.append((start, end))
        if start > 0:
            size = min(2 * size, max_group)
        start = end
    return out


def end_to_end_runs(pairs, starts, take, joins) -> list[tuple[int, list[PoolEntry]]]:
    """[(start, [entry, ...])]: the entries `take(entry)` keeps, grouped into runs that lie end to
    end in the fused buffer from `start` on and that `joins(run's first entry, entry)` allows."""
    runs: list[tuple[int, list[PoolEntry]]] = []
    end = None   # where the last run ends
    for (g, _), s in zip(pairs, starts):
        if not take(g):
            continue
        if runs and end == s and joins(runs[-1][1][0], g):
            runs[-1][1].append(g)
        else:
            runs.append((s, [g]))
        end = s + g.n_tokens
    return runs


def gather_runs(pairs, starts) -> list[tuple[int, int, list[PoolEntry]]]:
    """[(start, end, [entry, ...])]: the entries with a slot (not the chunks recomputed instead of
    loaded) in runs of one storage dtype, so the gather copies a layer of each run with one
    concatenation instead of one copy per chunk (H200, 33 chunks, 32 layers: 32 ms of host time
    queueing per-chunk copies)."""
    runs = end_to_end_runs(pairs, starts, lambda g: g.kv is not None, lambda r, g: r.kv.dtype == g.kv.dtype)
    return [(s, s + sum(g.n_tokens for g in run), run) for s, run in runs]


def scale_runs(pairs, starts) -> list[tuple[int, list[PoolEntry]]]:
    """[(start, [entry, ...])]: the chunks that hold codes and scales (not a recomputed chunk
    without a slot, nor the cold plan's prefilled front in the model dtype) grouped into runs of
    equal length that lie end to end in the fused buffer from `start` on."""
    return end_to_end_runs(pairs, starts, lambda g: g.kv is not None and g.scales is not None,
                           lambda r, g: r.n_tokens == g.n_tokens)


def tiers_for(store: Store, spec: ModelSpec, host_bytes: int, gpu_bytes: int, **kwargs) -> Tiers:
    """`Tiers` sized for a model's KV geometry (kwargs: device, chunk_tokens, policy, workers, ...)."""
    return Tiers(store, (spec.n_layers, spec.n_kv_heads, spec.head_dim), spec.dtype, host_bytes, gpu_bytes, **kwargs)


def open_load(tiers: Tiers, request_id: str, n_question: int, inv_freq: torch.Tensor, depth: int = 4,
              measure_stall: bool = False, first: int = 1, recompute=()) -> "LayerwiseLoad":
    """Resolve the request's chunks to GPU slots (hot) or pinned entries (warm/cold, waiting
    for disk reads) and start the layer-wise copies of layers 0..first-1. recompute: chunk
    ids that are not loaded (their tokens are recomputed: `LayerwiseLoad.recompute_positions`)."""
    pairs, counts = tiers.acquire(request_id, recompute=recompute)
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
        # [L, 2, H_kv, N + Q, D]: stored K/V at 0..N-1; the question's fresh K/V land in the tail. Where attention
        # runs at padded shapes (runtime/shape_buckets.py) the buffer holds the padded key length, the view
        # stops at N + Q and everything after N is zeroed: attention reads the padded keys in place, no copy
        pad = shape_buckets.enabled_on(device)
        cap = shape_buckets.bucket(N + n_question, shape_buckets.KEY_BUCKET) if pad else N + n_question
        buffer = torch.empty((L, 2, H, cap, D), dtype=tiers.dtype, device=device)                 # model dtype
        if pad:                                 # also when cap == N + Q: the question's rows are read padded
            buffer[:, :, :, N:].zero_()         # before its K/V land there (probes of fewer question rows)
            shape_buckets.zeroed_beyond(buffer)
        self.buffer = buffer                          # kept alive: the registry holds it weakly
        self.fused = buffer[:, :, :, :N + n_question]
        self.starts = (0, *self.layout.chunk_starts)
        # the gather as one kernel (copy, decode, re-rotation) where it runs; else torch ops, below
        self.front_kv = None   # [L, 2, H_kv, F, D]: the cold plan's prefilled front, copied beside the kernel
        self.kernel = self._kernel_plan(tiers, inv_freq) if (GATHER_KERNEL if GATHER_KERNEL is not None
                                                             else tiers.copy_stream is not None) else None
        self.cos = self.sin = None
        if self.kernel is None:   # [C] float32: how far each context token moves (new start - stored pos_base)
            shifts = [float(s - g.meta["pos_base"]) for g, s in zip(chunks, self.layout.chunk_starts)]
            delta = torch.repeat_interleave(torch.tensor(shifts), torch.tensor(self.layout.chunk_lens))
            self.cos, self.sin = rotation_table(host_to_device(delta, device), inv_freq)   # [C, D] float32 each
        self.context = slice(P, N)
        metas = [g.meta for g in chunks]
        tokens = torch.cat([m["tokens"].long() for m in metas])                  # [C]
        # on the model's device once: every pass (probe, repairs, recompute) indexes its picks' tokens
        # there, and a pageable copy per pass would wait for the GPU to drain first
        self.context_tokens = host_to_device(tokens, device)
        # [R] absolute positions of the chunks recomputed instead of loaded (no slot: kv None)
        spans = [torch.arange(s, s + g.n_tokens) for (g, _), s in zip(self.pairs[1:], self.starts[1:]) if g.kv is None]
        self.recompute_positions = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        # the prefix is recomputed only with every chunk (`Tiers.acquire`): then a plain prefill from its tokens
        self.prefix_tokens = None if prefix.kv is not None else prefix.meta["tokens"].long()   # [P]
        # with no chunk loaded the context span is never read (`prefill_over_prefix`): no zeroing, no rotation
        self.any_loaded = any(g.kv is not None for g in chunks)
        if prefix.kv is None and self.any_loaded:
            raise ValueError("the prefix can be recomputed only with every chunk (a full prefill); to recompute "
                             "a front of chunks, prefill [prefix, *front] and give its K/V as the prefix's entry")
        for (g, _), s in zip(self.pairs, self.starts):
            if g.kv is None and self.any_loaded:   # nothing stale (or NaN) where the recompute writes every layer
                self.fused[:, :, :, s:s + g.n_tokens].zero_()
        self.saliency = torch.cat([m["saliency"] for m in metas], dim=-1)        # [S_sig, C]
        self.timings: dict = {}
        self.n_layers = L
        self.issued = 0
        self.groups = layer_groups(L)
        self.group_of = [i for i, (a, b) in enumerate(self.groups) for _ in range(a, b)]   # layer -> group
        self.copied = 0   # groups whose copies are queued
        self.key_offsets = tiers.codec.key_offsets
        # pools hold codes [L, 2, H_kv, T, D] + scales [L, H_kv, W]: the chunks with codes, in runs
        # of equal length laid end to end (one dequantisation per run and layer)
        self.scale_runs = scale_runs(pairs, self.starts) if tiers.codec.quantised else []
        self.group_rows, self.rows_group = [], -1   # the runs' scale rows of layer group rows_group (issue)
        self.gather_runs = gather_runs(pairs, self.starts) if self.kernel is None else []
        self.h2d_bytes = sum(h.nbytes for _, h in pairs if h is not None)
        self.repaired_in_place = False   # a selection repaired tokens into `fused` (repair_cache)
        self.h2d, self.stream = tiers.h2d_stream, tiers.copy_stream
        cuda = self.stream is not None
        timing = measure_stall and cuda
        # h2d_events[i]: group i's pinned -> GPU-slot copies are done; events[l]: layer l is in `fused`
        self.h2d_events = [torch.cuda.Event(enable_timing=timing) for _ in self.groups] if cuda else []
        self.events = [torch.cuda.Event(enable_timing=timing) for _ in range(L)] if cuda else []
        self.stall_marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = [] if timing else None
        self.waited: dict = {}   # compute stream -> the last layer it has waited for (`wait`, `wait_all`)
        if cuda:
            compute = torch.cuda.current_stream(device)
            self.t_start = torch.cuda.Event(enable_timing=True)
            for stream in (self.h2d, self.stream):
                stream.wait_stream(compute)  # fused was allocated on the compute stream
                self.fused.record_stream(stream)
            self.t_start.record(self.h2d)
        t_issue = time.perf_counter()
        self.issue(max(1, first))
        self.timings["issue_s"] = time.perf_counter() - t_issue   # the host queueing the first layers' gathers

    # ---- the side streams ----------------------------------------------------------
    def issue(self, upto: int) -> None:
        """Queue the work of layers [issued, upto) on the side streams (returns at once):
        pinned -> GPU slot on the copy engine's stream (a layer group's copies when the
        group's first layer comes up), then gather + re-rotation on the other."""
        upto = min(upto, self.n_layers)
        cuda = self.stream is not None
        for l in range(self.issued, upto):
            gi = self.group_of[l]
            a, b = self.groups[gi]
            if gi >= self.copied:
                self._copy_group(gi, a, b)
            with torch.cuda.stream(self.stream) if cuda else nullcontext():
                if cuda:
                    self.stream.wait_event(self.h2d_events[gi])
                if self.kernel is not None:   # copy, decode and re-rotation in one kernel
                    self.kernel.launch(self.fused[l], l)
                    if self.front_kv is not None:   # the prefilled front: model dtype, at 0, not rotated
                        # (queued on the compute stream before this load: both side streams wait for
                        # it in __init__, and the entry holds it until close() waits for the last layer)
                        self.fused[l, :, :, :self.front_kv.shape[3]].copy_(self.front_kv[l])
                else:
                    self._gather(l, gi)
                if cuda:
                    self.events[l].record(self.stream)
        self.issued = max(self.issued, upto)
        if self.issued:  # the first layers are queued: the rest of the copies go now, to keep the copy engine busy
            for gi in range(self.copied, len(self.groups)):
                self._copy_group(gi, *self.groups[gi])

    def _gather(self, l: int, gi: int) -> None:
        """Layer l of every loaded entry into the fused buffer, decoded and re-rotated (torch ops,
        queued on the current stream; gi: l's layer group)."""
        for start, end, run in self.gather_runs:     # one concatenation per run of adjacent chunks
            dst = self.fused[l, :, :, start:end]       # [2, H_kv, n, D]
            src = [g.kv[l] for g in run]               # [2, H_kv, T, D] each, contiguous in its slot
            if src[0].dtype == dst.dtype:
                torch.cat(src, dim=2, out=dst)
            else:   # codes: gathered as stored (as bytes: cat's batched kernel), converted by one copy
                dst.copy_(torch.cat([x.view(torch.uint8) for x in src], dim=2).view(src[0].dtype))
        a, b = self.groups[gi]
        if self.scale_runs and self.rows_group != gi:   # each run's scales of the group, stacked once
            self.group_rows = [run[0].scales[a:b, :, None] if len(run) == 1 else
                               torch.stack([g.scales[a:b] for g in run], 2) for _, run in self.scale_runs]
            self.rows_group = gi                          # [b-a, H_kv, n, W] per run
        for (start, run), rows in zip(self.scale_runs, self.group_rows):  # codes -> KV, before the rotation
            dequantize_(self.fused[l, :, :, start:start + len(run) * run[0].n_tokens], rows[l - a],
                        self.key_offsets)  # rows [H_kv, n, W]
        if self.any_loaded:
            rotate_keys_(self.fused[l, 0, :, self.context], self.cos, self.sin)  # [H_kv, C, D]

    def _kernel_plan(self, tiers: Tiers, inv_freq: torch.Tensor):
        """The fused gather kernel's plan for this request's loaded entries, or None (no Triton,
        an entry outside the GPU pool's arena). The cold plan's prefilled front (the prefix's
        entry, fresh K/V in the model dtype, outside the pool) is left out of the kernel and
        copied beside it, layer by layer (`front_kv`)."""
        from .gather_kernel import GatherPlan, in_arena
        # (entry, new start, position shift): the prefix stays where it is (the torch path leaves it unrotated)
        loaded = [(g, s, 0.0 if i == 0 else float(s - g.meta["pos_base"]))
                  for i, ((g, _), s) in enumerate(zip(self.pairs, self.starts)) if g.kv is not None]
        front = None
        first = loaded[0][0] if loaded else None
        if (first is self.pairs[0][0] and first.scales is None and first.kv.dtype == self.fused.dtype
                and not in_arena(first.kv, tiers.gpu.arena)):   # K/V as the torch path would copy them
            front = loaded.pop(0)[0].kv
        if not loaded:
            return None
        quantised = tiers.codec.quantised
        plan = GatherPlan.build([g.kv for g, _, _ in loaded], [g.scales for g, _, _ in loaded] if quantised else None,
                                [s for _, s, _ in loaded], [shift for _, _, shift in loaded],
                                tiers.gpu.arena, tiers.gpu.scale_arena if quantised else None, inv_freq,
                                tiers.codec.key_cols)
        if plan is not None:
            self.front_kv = front
        return plan

    def _copy_group(self, gi: int, a: int, b: int) -> None:
        """Warm/cold chunks' layers a..b-1, pinned -> GPU slot: one copy per chunk ([b-a, 2, H_kv, T, D],
        contiguous in both slots), then event h2d_events[gi] on the copy stream."""
        cuda = self.stream is not None
        with torch.cuda.stream(self.h2d) if cuda else nullcontext():
            moves = [(g.kv[a:b], h.kv[a:b]) for g, h in self.pairs if h is not None]
            if self.scale_runs:  # + the codes' scales of those layers, [b-a, H_kv, W] each
                moves += [(g.scales[a:b], h.scales[a:b]) for g, h in self.pairs if h is not None]
            if moves:
                torch._foreach_copy_([d for d, _ in moves], [s for _, s in moves], non_blocking=True)
            if cuda:
                self.h2d_events[gi].record(self.h2d)
        self.copied = gi + 1

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
            compute = torch.cuda.current_stream(self.fused.device)
            compute.wait_event(self.events[-1])
            self.waited[compute] = self.n_layers - 1

    def wait(self, layer: int, ahead: int | None = None) -> None:
        """Called on the compute stream before layer `layer` reads its K/V: no host sync. A
        stream that already waited for layer >= `layer` (an earlier pass) waits for nothing.

        Queues this layer if it isn't yet, and at most two more, up to `ahead` (default:
        depth) layers past it: the host's issuing cost is spread over the layer loop instead
        of delaying the launch of the layer the GPU waits for."""
        self.issue(max(layer + 1, min(layer + 1 + (self.depth if ahead is None else ahead), self.issued + 2)))
        if self.stream is None:
            return
        compute = torch.cuda.current_stream(self.fused.device)
        if layer <= self.waited.get(compute, -1):   # an earlier pass on this stream waited for it: ordered already
            return
        self.waited[compute] = layer                # events complete in layer order: waiting for l covers 0..l
        if self.stall_marks is None:
            compute.wait_event(self.events[layer])
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(compute)
        compute.wait_event(self.events[layer])
        b.record(compute)
        self.stall_marks.append((a, b))

    def repair_cache(self, slots: torch.Tensor) -> DynamicCache:
        """A repair pass's cache over the request's own fused buffer: layer l waits for its
        copy, then the pass writes the slots' fresh K/V into it in place (the question's into
        the tail, scratch); the final recompute reads them from there."""
        self.repaired_in_place = True
        return RepairLayer.cache(self.fused, self.layout.question_start, slots, wait=self.wait)

    def reset_working(self) -> None:
        """A run starts. RuntimeError if an earlier run repaired the buffer in place: it no
        longer holds the stored KV (the engine runs one selection per load)."""
        if self.repaired_in_place:
            raise RuntimeError("this layer-wise load was repaired in place by an earlier run; load the chunks again")

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
                   attention: str | None = None, rates: LoadRates | None = None,
                   recompute: Sequence[str] = ()) -> FusionResult:
    """Fused prefill of a queued request ([prefix, *chunks]) with layer-wise loading.

    The fusion driver (`fusion.run`) over a `LayerwiseLoad`: same result as `fusion.fuse`
    over the same chunks (the selection may be given as `selected`, absolute positions, to
    skip the selector). Timings: open_s (tier lookup and disk waits), select_s,
    recompute_s, total_s; counts hot/warm/cold/recompute; stall_ms and copy_ms with measure_stall.
    attention / groups: the recompute's attention backend (`recompute_attention`; default
    per device; groups > 1 selects `grouped` with that many query groups).
    rates: with them, when chunks are in no pool the cold-load plan (`coldplan.plan_cold`)
    decides how many chunks from the front to prefill from their tokens while the rest load
    (timings["cold_plan"]: choices, estimates, rates; "front_tokens"; the result's layout then
    has [prefix, *front] as its prefix and `recomputed` starts with the front's positions), and
    the rates learn from this request. recompute: chunk ids (not the prefix) to recompute instead
    of loading (as with `selected`: the fused result with their tokens selected).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    t0 = time.perf_counter()
    question_ids = torch.as_tensor(question_ids).long()
    n_probe = probe_depth(selector, lm.spec.n_layers) if selected is None else 0
    chunk_ids = list(tiers.queue.chunks(request_id) or ())
    plan, recompute, front_kv, prefix_pooled = None, list(recompute), None, True
    if rates is not None:
        plan, prefix_pooled = plan_request_loads(tiers, request_id, len(question_ids), selector, ratio, rates,
                                                 lm.spec.n_layers)
    front = plan.front if plan is not None else 0
    if front and front == len(chunk_ids) - 1 and not prefix_pooled and selected is None and not recompute:
        # nothing pooled, everything recomputed: the full prefill from the tokens, queued on the GPU
        # before any of the loader's bookkeeping (no fused buffer, no pool entries)
        result = prefill_everything(lm, tiers, request_id, chunk_ids, question_ids, t0)
        result.timings["cold_plan"] = plan.as_dict()
        learn_rates(rates, plan, result, len(question_ids))
        return result
    if front and front == len(chunk_ids) - 1:       # every chunk: a full prefill (over the prefix if pooled)
        recompute += chunk_ids[1:] if prefix_pooled else chunk_ids
        # reads not yet started are cancelled: eight reader threads copying into pinned memory slow the
        # host that launches the prefill (H200, 16k: 641 ms against 586 ms with the disk idle)
        tiers.prefetcher.skip(request_id, recompute)
    elif front:                                     # prefill the front from its tokens while the back loads
        recompute += chunk_ids[:1 + front]
        front_kv, front_tokens, n_prefix = prefill_front(lm, tiers, request_id, chunk_ids[:1 + front])
    t_acquire = time.perf_counter()
    pairs, counts = tiers.acquire(request_id, recompute=recompute)   # waits for the disk reads of the back
    t_acquire = time.perf_counter() - t_acquire
    if front_kv is not None:   # the front's fresh K/V is the prefix of the fused pass over the back
        tiers.release_entries(pairs[:1 + front])   # hot ones among them were acquired: not used
        meta = {"tokens": front_tokens, "saliency": None, "pos_base": 0}
        pairs = [(PoolEntry(chunk_ids[0], -1, front_kv.shape[3], 0, front_kv, meta=meta), None), *pairs[1 + front:]]
    load = LayerwiseLoad(tiers, request_id, pairs, len(question_ids), lm.rope_inv_freq(), depth, measure_stall,
                         counts, first=n_probe)
    load.timings.update(open_s=time.perf_counter() - t0, acquire_s=t_acquire)
    try:
        if selected is None and load.recompute_positions.numel() == load.layout.context_len > 0:
            result = prefill_over_prefix(lm, load, question_ids)   # nothing loaded to select from
        else:
            prep = prepare_from(lm, load, question_ids, per_request=True)
            result = run(prep, selector, ratio, selected=selected, attention=attention, groups=groups)
    finally:
        copy = load.close()
    result.timings.update(copy)
    if front_kv is not None:   # the front's tokens were recomputed too (they are the pass's prefix in its layout)
        result.recomputed = torch.cat((torch.arange(n_prefix, front_kv.shape[3]), result.recomputed))
        result.timings["front_tokens"] = int(front_kv.shape[3])
    if plan is not None:
        result.timings["cold_plan"] = plan.as_dict()
    if rates is not None:
        learn_rates(rates, plan, result, len(question_ids),
                    fused_as=(selector, ratio, lm.spec.n_layers) if selected is None and not recompute else None)
    return result


def prefill_front(lm: LoadedModel, tiers: Tiers, request_id: str,
                  ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prefill [prefix, *front chunks] from their tokens (queued on the GPU; the host returns at once):
    (K/V [L, 2, H_kv, P', D] on the model's device, tokens [P'] int64, the prefix's length). Their
    reads not yet started are cancelled first, so the disk serves the chunks that will be loaded."""
    tiers.prefetcher.skip(request_id, ids)
    metas = tiers.read_metas(ids)
    tokens = torch.cat([metas[c]["tokens"].long() for c in ids])                         # [P']
    cache, _ = full_prefill(lm, tokens)
    # the model's dtype (`tiers.dtype`), not the pools' (`tiers.gpu.dtype`): a quantised store's pools
    # hold fp8 / int8 codes, and casting fresh K/V to them without scales rounded (int8: truncated) it
    return kv_from_cache(cache).to(tiers.dtype), tokens, len(metas[ids[0]]["tokens"])


def prefill_everything(lm: LoadedModel, tiers: Tiers, request_id: str, chunk_ids: list[str],
                       question_ids: torch.Tensor, t0: float) -> FusionResult:
    """A queued request whose chunks (prefix included) are all recomputed: the full prefill of
    its tokens. The chunks' reads not yet started are cancelled and the request leaves the
    queue; only the tokens are read (from the reader's metadata cache when it has them).
    t0: when the request's handling began (perf_counter), for open_s."""
    try:
        tiers.prefetcher.skip(request_id, chunk_ids)
        metas = tiers.read_metas(chunk_ids)
        prefix_tokens = metas[chunk_ids[0]]["tokens"].long()
        context = [metas[c]["tokens"].long() for c in chunk_ids[1:]]
        t_open = time.perf_counter()
        cache, logits = full_prefill(lm, torch.cat((prefix_tokens, *context, question_ids.long())))
    finally:
        tiers.prefetcher.finish(request_id)             # (on success: while the GPU runs the prefill)
    if lm.model.device.type == "cuda":
        torch.cuda.current_stream(lm.model.device).synchronize()
    t_done = time.perf_counter()
    P, C = len(prefix_tokens), sum(len(t) for t in context)
    layout = FusedLayout(prefix_len=P, chunk_ids=tuple(chunk_ids[1:]), chunk_lens=tuple(len(t) for t in context),
                         question_len=len(question_ids))
    return FusionResult(cache, logits, layout, torch.arange(P, P + C), timings={
        "open_s": t_open - t0, "plain_prefill": True, "select_s": 0.0, "recompute_s": t_done - t_open,
        "total_s": t_done - t0, "hot": 0, "warm": 0, "cold": 0, "recompute": len(chunk_ids), "h2d_bytes": 0})


def prefill_over_prefix(lm: LoadedModel, load: "LayerwiseLoad", question_ids: torch.Tensor) -> FusionResult:
    """Every chunk recomputed: a plain prefill of context + question over the stored prefix (the
    model's own causal attention, as a full prefill runs it). Same function as recomputing every
    context token over the fused cache, without the scattered-query machinery."""
    t0 = time.perf_counter()
    layout = load.layout
    P, C = layout.prefix_len, layout.context_len
    tokens = torch.cat((load.context_tokens, question_ids.to(load.context_tokens.device)))    # [C + Q]
    if load.prefix_tokens is not None:       # nothing loaded at all: the full prefill itself
        cache, logits = full_prefill(lm, torch.cat((load.prefix_tokens, tokens)))
    else:
        load.wait_all()                      # only the prefix was copied
        prefix_only = FusedLayout(prefix_len=P, chunk_ids=(), chunk_lens=(), question_len=C + len(question_ids))
        cache, logits = recompute_pass(lm, load.stored[:, :, :, :P], prefix_only, tokens[:0], tokens,
                                       torch.zeros(0, dtype=torch.long))
    if lm.model.device.type == "cuda":
        torch.cuda.current_stream(lm.model.device).synchronize()
    t_done = time.perf_counter()
    got = dict(load.timings)
    return FusionResult(cache, logits, layout, torch.arange(P, P + C), timings={
        **got, "plain_prefill": True, "select_s": 0.0, "recompute_s": t_done - t0, "total_s": sum(got.values()) + t_done - t0})


def plan_request_loads(tiers: Tiers, request_id: str, n_question: int, selector: str, ratio: float,
                       rates: LoadRates, n_layers: int) -> tuple[ColdPlan | None, bool]:
    """(the cold-load plan of a queued request, or None when every chunk is pooled; whether its
    prefix is pooled: hot or warm)."""
    (prefix_state, n_prefix, _), *states = tiers.chunk_states(request_id)
    pooled = prefix_state in ("hot", "warm")
    if not any(s in ("reading", "cold") for s, _, _ in states):
        return None, pooled
    chunks = [ChunkLoad(s, n, b) for s, n, b in states]
    return plan_cold(chunks, rates, n_prefix, n_question,
                     lambda n: fused_tokens(n, n_question, selector, ratio, n_layers)), pooled


def learn_rates(rates: LoadRates, plan: ColdPlan | None, result: FusionResult, n_question: int,
                fused_as: tuple[str, float, int] | None = None) -> None:
    """Feed what a request measured back into the rates: the disk wait of the chunks it loaded
    from disk (when nothing ran meanwhile); a plain prefill's tokens per second, or how much
    longer a fused pass took than its token count says (fused_as: its (selector, ratio,
    n_layers), for a pass that selected by itself); and (with measure_stall) its copies."""
    t = result.timings
    # open_s was the wait for the reads alone (nothing prefilled meanwhile), and long enough that the
    # fixed costs in it don't make the disk look slow (which would make the plan recompute needlessly)
    if plan is not None and t.get("cold", 0) and plan.disk_bytes >= LEARN_DISK_BYTES and not plan.front:
        rates.observe_disk(plan.disk_bytes, t.get("open_s", 0.0))
    pass_s = t.get("select_s", 0.0) + t.get("recompute_s", 0.0)
    if t.get("plain_prefill"):   # one pass ran every token: the prefill rate
        rates.observe_prefill(result.n_recomputed + n_question, pass_s)
    elif fused_as is not None:
        estimate = fused_tokens(result.layout.context_len, n_question, *fused_as) / rates.prefill_tok_s
        rates.observe_fused(estimate, pass_s)
    if "h2d_ms" in t:
        rates.observe_h2d(t.get("h2d_bytes", 0), t["h2d_ms"] * 1e-3)
