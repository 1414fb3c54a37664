"""Attention of the recompute pass: scattered queries over the fused cache (DESIGN §4).

    with scattered_queries(positions, n_keys):        # [S + Q] absolute positions, ascending
        lm.model(input_ids=..., position_ids=positions[None], **cache_kwargs(lm.model, cache), attention_mask=None)

The recomputed context tokens sit at scattered positions and the question at the
end; the query at position p sees the keys at positions <= p. Inside
`scattered_queries` the model's `kvfuse` attention (runtime/attention.py) hands
the pass's queries to `ScatteredQueries.attend` instead of SDPA with a dense
float mask, and the `kvfuse` mask function returns no mask at all. Backends:

* `flex`: FlexAttention with a block mask built from the
  positions: key blocks wholly after a query block's last position are
  skipped, blocks wholly before its first run without the mask function, only
  the diagonal band evaluates `k <= qpos[q]`; grouped-query heads read their
  shared KV head (`enable_gqa`), no `repeat_kv`. Built once per pass (a few
  small tensor ops on the device, no host sync) and shared by every layer.
* `sdpa` (the CPU's default; on CUDA for passes of at most SMALL_PASS_ROWS
  queries): SDPA with one boolean mask [S+Q, K] per pass,
  shared by every layer, and `enable_gqa` instead of `repeat_kv`.
* `dense`: the former path, `repeat_kv` + SDPA with a float mask: the reference.
* `grouped`: queries split into groups by position, each attending only the key
  prefix it can see (`plan_query_groups`); needs the positions on the host.
* `split` (CUDA's default for large passes): the queries cut into groups of
  SPLIT_GROUP_ROWS rows; each group's
  common key prefix (every key before its first position) through one unmasked
  SDPA call (cuDNN on Hopper) that returns its log-sum-exp, the band after it
  (keys between the group's first position and each row's own) through one
  FlexAttention call for all groups, the two merged by log-sum-exp. Same
  function as `flex`; needs the positions on the host for the prefixes' lengths
  (a pass whose picks come from the host has them; one kept on the GPU, as a3's,
  waits for them once per pass; a pass that narrows inside runs `flex` there).

`KVFUSE_RECOMPUTE_ATTENTION=<backend>` overrides the default (for measurements).
If FlexAttention fails (an old torch, no compiler), the process falls back to
`dense` on CUDA (`sdpa` elsewhere) with a warning, once.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from . import shape_buckets

BACKENDS = ("flex", "sdpa", "dense", "grouped", "split")
# The CUDA default for passes of more than SMALL_PASS_ROWS queries. Per layer on the H200 (Llama-3-8B,
# `bench/dev/split_probe.py`, bench/results/split_probe_h200.json): `split` 1.52 ms against flex 2.39
# at 16k with 2,490 rows, 3.81 against 7.03 at 32k with 4,947 (uniform picks; late picks 1.58 / 3.03
# and 4.55 / 10.5); through the engine the default selector's warm TTFT 383 -> 323 ms at 16k and
# 803 -> 648 at 32k (docs/loader.md). Before it: flex (1.46 ms against SDPA with a float mask 2.02).
CUDA_BACKEND = "split"
FLEX_BLOCK = 128
SMALL_PASS_ROWS = 1024        # passes of at most this many queries (question probes, repair passes at 16k) ...
SMALL_PASS_BACKEND = "sdpa"   # ... use this on CUDA: cuDNN with a boolean mask; 851 rows at 16k 0.88 ms against
                              # flex 1.24, split 1.29; 1,670 rows at 32k 3.35 against split 2.43 (split_probe).
                              # Split-KV (the keys in 2-16 pieces, one batched cuDNN call with a mask, merged by
                              # log-sum-exp) won only under ~200 rows (32 rows at 32k: 0.76 -> 0.32 ms) and lost
                              # through the engine (smallpass_probe_h200.json; removed after d438f90)
SPLIT_GROUP_ROWS = 512        # `split`: query rows per common-prefix group (a multiple of FLEX_BLOCK: a query
                              # block lies in one group)
SPLIT_MIN_PREFIX = 1024       # `split`: a group's prefix shorter than this many keys stays in the band
SPLIT_PREFIX_ALIGN = 1024     # `split` at padded shapes: a group's prefix rounded down to a multiple of this (a
                              # multiple of FLEX_BLOCK): few prefix lengths, so cuDNN plans each once (shape_buckets)
_flex_failed: str | None = None     # the error that made flex unusable in this process
_flex_compiled = None


def default_backend(device: torch.device | str, rows: int | None = None) -> str:
    """The backend a pass of `rows` queries on `device` uses: $KVFUSE_RECOMPUTE_ATTENTION, else
    on CUDA $KVFUSE_SMALL_PASS_ATTENTION (SMALL_PASS_BACKEND) for a pass of at most SMALL_PASS_ROWS
    ($KVFUSE_SMALL_PASS_ROWS) queries (flex and split parallelise over query blocks, so a few rows
    over 16k keys leave most of the GPU idle) and $KVFUSE_LARGE_PASS_ATTENTION (CUDA_BACKEND) for
    larger ones; sdpa elsewhere. Each variable is checked on every device: ValueError naming it for
    a backend not in BACKENDS or a row count that is not a number."""
    if os.environ.get("KVFUSE_RECOMPUTE_ATTENTION"):
        return _backend_setting("KVFUSE_RECOMPUTE_ATTENTION", "")
    small = _backend_setting("KVFUSE_SMALL_PASS_ATTENTION", SMALL_PASS_BACKEND)
    large = _backend_setting("KVFUSE_LARGE_PASS_ATTENTION", CUDA_BACKEND)
    limit = os.environ.get("KVFUSE_SMALL_PASS_ROWS", str(SMALL_PASS_ROWS))
    if not limit.strip().isdigit():
        raise ValueError(f"KVFUSE_SMALL_PASS_ROWS={limit!r}: give a number of query rows (default {SMALL_PASS_ROWS})")
    if torch.device(device).type != "cuda":
        return "sdpa"
    if rows is not None and rows <= int(limit):
        large = small
    if large == "split" and _split_failed is not None:
        large = "flex"
    return "dense" if large in ("flex", "split") and _flex_failed is not None else large


def _backend_setting(variable: str, default: str) -> str:
    """A backend name from the environment; ValueError naming the variable for one not in BACKENDS."""
    name = os.environ.get(variable, default)
    if name not in BACKENDS:
        raise ValueError(f"{variable}={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


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


def flex_block_mask(positions: torch.Tensor, n_keys: int, block: int = FLEX_BLOCK, first_key: torch.Tensor | None = None):
    """FlexAttention BlockMask for queries at `positions` [R] (ascending in a recompute pass;
    any order works) over keys 0..n_keys-1.

    Query block i (rows i*block..) sees key block j fully if j's last key <= the block's
    lowest position, partly (mask_mod decides) if j's first key <= its highest position.
    first_key [nq] (multiples of `block`, on the device): query block i sees no key before
    first_key[i] (the `split` backend's band: the prefix before it is attended elsewhere)."""
    from torch.nn.attention.flex_attention import BlockMask

    R, dev = positions.numel(), positions.device
    nq, nk = -(-R // block), -(-n_keys // block)
    pos = torch.cat((positions, positions[-1:].expand(nq * block - R)))       # [nq * block]
    rows = pos.view(nq, block)
    first, last = rows.min(-1).values, rows.max(-1).values                    # [nq] min / max position
    k_first = torch.arange(nk, device=dev) * block                            # [nk]
    k_last = (k_first + block - 1).clamp(max=n_keys - 1)
    full = k_last[None, :] <= first[:, None]                                  # [nq, nk]
    partial = (k_first[None, :] <= last[:, None]) & ~full
    if first_key is not None:
        after = k_first[None, :] >= first_key[:, None]                        # [nq, nk]
        full, partial = full & after, partial & after

    def blocks(m: torch.Tensor):
        num = m.sum(-1, dtype=torch.int32)[None, None]                          # [1, 1, nq]
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
        return num, order                                                     # listed blocks first, in order

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= pos[q_idx]

    if first_key is not None:   # the blocks before first_key are left out above; the mask says so too
        lo = first_key.repeat_interleave(block)                               # [nq * block] per row

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811
            return (kv_idx <= pos[q_idx]) & (kv_idx >= lo[q_idx])

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(full)
    extra = {"compute_q_blocks": False} if "compute_q_blocks" in _from_kv_blocks_params() else {}  # no backward
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(R, n_keys), **extra)


@functools.cache
def _from_kv_blocks_params() -> frozenset:
    from torch.nn.attention.flex_attention import BlockMask
    return frozenset(inspect.signature(BlockMask.from_kv_blocks).parameters)


def _flex_attention(device: torch.device):
    """flex_attention, compiled on CUDA (its fused kernel); eager elsewhere (a correct, slow reference)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=True)  # one kernel for every (rows, keys)
    return _flex_compiled


def group_prefix(first_positions: torch.Tensor, block: int | None = None, min_prefix: int | None = None):
    """Keys every row of a group sees, from the group's first (lowest) position: rounded down to
    a multiple of `block`, 0 when under `min_prefix`. The same integer arithmetic on the host
    (the prefix calls' lengths) and on the device (the band's block mask). Defaults: FLEX_BLOCK
    (SPLIT_PREFIX_ALIGN where the calls are padded), SPLIT_MIN_PREFIX."""
    block = FLEX_BLOCK if block is None else block
    min_prefix = SPLIT_MIN_PREFIX if min_prefix is None else min_prefix
    prefix = torch.div(first_positions, block, rounding_mode="floor") * block
    return torch.where(prefix >= min_prefix, prefix, torch.zeros_like(prefix))


def split_groups(host_positions: torch.Tensor, group_rows: int | None = None,
                 align: int | None = None) -> list[tuple[int, int, int]]:
    """[(first row, end row, prefix keys)] of the `split` backend: rows cut every `group_rows`
    (default SPLIT_GROUP_ROWS; ascending positions), each group's prefix from its first row's
    position (`group_prefix` with block `align`)."""
    group_rows = SPLIT_GROUP_ROWS if group_rows is None else group_rows
    starts = torch.arange(0, host_positions.numel(), group_rows)
    prefixes = group_prefix(host_positions[starts], align).tolist()
    return [(a, min(a + group_rows, host_positions.numel()), p) for a, p in zip(starts.tolist(), prefixes)]


_lse_path: str | None = None   # the prefix kernel that worked in this process ("cudnn", "cudnn-expanded")
_split_failed: str | None = None   # why `split` could not run here (then large passes run `flex`)


class CudnnUnavailable(RuntimeError):
    """cuDNN's attention (with its log-sum-exp) does not run here: `split` gives way to `flex`."""


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
    """Unmasked attention of query [B, H_q, r, D] over key/value [B, H_kv, P, D] (H_kv divides
    H_q: grouped-query heads read their shared KV head) -> (out [B, H_q, r, D] in the query's
    dtype, log-sum-exp [B, H_q, r] float32, natural log). On CUDA cuDNN's fused kernel (with the
    KV heads expanded if this cuDNN takes no grouped heads; CudnnUnavailable if neither runs);
    elsewhere plain float32 matmuls (the CPU tests' reference)."""
    global _lse_path
    b, n_q_heads, r, d = query.shape
    n_kv_heads = key.shape[1]
    if query.is_cuda:
        for path in ("cudnn", "cudnn-expanded") if _lse_path is None else (_lse_path,):
            k, v = key, value
            if path == "cudnn-expanded" and n_q_heads != n_kv_heads:
                k, v = (t[:, :, None].expand(b, n_kv_heads, n_q_heads // n_kv_heads, *t.shape[2:])
                        .reshape(b, n_q_heads, *t.shape[2:]) for t in (key, value))
            try:
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    query, k, v, None, True, 0.0, False, False, scale=scale)[:2]
                _lse_path = path
                return out, lse.reshape(b, n_q_heads, r).float()
            except RuntimeError:
                continue
        raise CudnnUnavailable("cuDNN attention with log-sum-exp is not available on this GPU / torch")
    grouped = query.float().reshape(b, n_kv_heads, n_q_heads // n_kv_heads * r, d)    # head h reads KV head h // G
    scores = (grouped @ key.float().transpose(-1, -2)) * scale                         # [B, H_kv, G*r, P]
    lse = scores.logsumexp(-1)                                                         # [B, H_kv, G*r]
    out = (scores - lse[..., None]).exp() @ value.float()                              # [B, H_kv, G*r, D]
    return out.reshape(b, n_q_heads, r, d).to(query.dtype), lse.reshape(b, n_q_heads, r)


@functools.cache
def _flex_with_lse(device: torch.device):
    """(query, key, value, block_mask, scale) -> (out, log-sum-exp): flex with grouped-query heads,
    asking for the log-sum-exp the way this torch takes it (`return_aux` from 2.9, else `return_lse`)."""
    flex = _flex_attention(device)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return lambda q, k, v, mask, scale: flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True,
                                                 return_lse=True)

    def call(q, k, v, mask, scale):
        out, aux = flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True, return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return call


class ScatteredQueries:
    """The queries of one recompute pass: positions [R] (ascending) over `n_keys` keys.

    The masks each backend needs are built on first use and shared by every layer.
    host_positions: the same positions on the host, when the caller has them (`split` needs
    them for its prefix lengths; without them it copies them to the host: a wait)."""

    def __init__(self, positions: torch.Tensor, n_keys: int, backend: str | None = None,
                 host_positions: torch.Tensor | None = None):
        self.positions = positions                     # [R] int64, on the model's device
        self.rows, self.n_keys = positions.numel(), n_keys
        self.backend = backend or default_backend(positions.device, self.rows)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown recompute attention {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.backend == "split" and host_positions is None:   # e.g. a selection kept on the GPU (a3):
            host_positions = positions.cpu()                       # one wait for it, then cuDNN's speed
        self.host_positions = host_positions
        self.pad = shape_buckets.enabled(positions)    # CUDA: cuDNN calls at padded shapes (shape_buckets)
        self._bool: dict = {}                          # padded? -> `allowed(padded)`
        self._float: dict = {}
        self._block = None
        self._split_plan = None
        self._recorded: dict = {}                      # the recorder's masks by recorded rows (`recorded`)
        self.plan: list[tuple[int, int, int]] | None = None

    def allowed(self, padded: bool = False) -> torch.Tensor:
        """[1, 1, R, K] bool: query row r sees key k iff k <= positions[r]. padded: [1, 1, R', K']
        at shape_buckets' buckets (rows of ROW_BUCKET, keys of KEY_BUCKET): the extra rows see key
        0 only (position 0), no row sees the extra keys (every position is below K)."""
        if padded not in self._bool:
            rows, n_keys, positions = self.rows, self.n_keys, self.positions
            if padded:
                rows = shape_buckets.bucket(rows, shape_buckets.ROW_BUCKET)
                n_keys = shape_buckets.bucket(n_keys, shape_buckets.KEY_BUCKET)
                positions = torch.cat((positions, positions.new_zeros(rows - self.rows)))
            keys = torch.arange(n_keys, device=positions.device)
            self._bool[padded] = (keys[None, :] <= positions[:, None])[None, None]
        return self._bool[padded]

    def first_unseen(self, rows: slice) -> int:
        """The first key that some row in `rows` can't see (its lowest position + 1), from the
        host positions; 0 without them (no host sync: the recorder then masks every column)."""
        if self.host_positions is None:
            return 0
        picked = self.host_positions[rows]
        return min(int(picked.min()) + 1, self.n_keys) if picked.numel() else 0

    def row_mask(self, rows: slice, first_key: int = 0) -> torch.Tensor:
        """[1, 1, r, K - first_key] bool mask of the recorded rows over keys first_key.. (for the
        attention recorder)."""
        keys = torch.arange(first_key, self.n_keys, device=self.positions.device)
        return (keys[None, :] <= self.positions[rows][:, None])[None, None]

    def recorded(self, rows: slice) -> tuple[int, torch.Tensor]:
        """(first_unseen(rows), ~row_mask(rows, that)): the keys the recorded `rows` can't see,
        from their first unseen key on ([1, 1, r, K - first] bool, True = hidden), built once per
        pass and shared by every layer."""
        key = (rows.start, rows.stop, rows.step)
        if key not in self._recorded:
            first = self.first_unseen(rows)
            self._recorded[key] = first, ~self.row_mask(rows, first)
        return self._recorded[key]

    def additive(self, dtype, padded: bool = False) -> torch.Tensor:
        """[1, 1, R, K] additive mask in `dtype` (padded: of `allowed(padded=True)`, [1, 1, R', K']),
        0 where a row sees the key and -65504 (-65536
        in bfloat16) where not: what SDPA makes of `allowed()` when it runs cuDNN (torch's
        `convert_boolean_attn_mask_cudnn`, a finite value because of cuDNN's -inf handling),
        made once per pass instead of inside every layer's call. On the H200, where cuDNN runs
        these passes, it is the mask the bool mask became, so the attention is the same; on a
        backend whose conversion gives -inf instead, every row still sees key 0, so a hidden
        key's weight underflows to exactly 0 either way (tests/test_attention_recorder.py)."""
        return self._additive(dtype, -65504.0, padded)

    def float_mask(self, dtype) -> torch.Tensor:
        """[1, 1, R, K] additive mask (0 / dtype min), as the `dense` path gives SDPA."""
        return self._additive(dtype, torch.finfo(dtype).min)

    def _additive(self, dtype, hidden_value: float, padded: bool = False) -> torch.Tensor:
        """`allowed(padded)` as an additive mask in `dtype` (0 / hidden_value), built once per pass."""
        key = (dtype, hidden_value, padded)
        if key not in self._float:
            allowed = self.allowed(padded)
            self._float[key] = torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), hidden_value)
        return self._float[key]

    def attend(self, module, query, key, value, scaling) -> torch.Tensor:
        """query [1, H_q, R, D], key/value [1, H_kv, K, D] -> output [1, R, H_q, D]."""
        global _flex_failed
        global _split_failed
        if self.backend == "split":
            try:
                return self._split(query, key, value, scaling)
            except CudnnUnavailable as exc:   # large passes run flex from now on
                _split_failed = str(exc)
                self.backend = "flex"
                warnings.warn(f"{exc}; the recompute's large passes run flex attention", stacklevel=2)
            except Exception as exc:  # noqa: BLE001 - flex inside it failed
                _flex_failed = f"{type(exc).__name__}: {exc}"
                self.backend = "dense" if query.device.type == "cuda" else "sdpa"
                warnings.warn(f"split attention failed ({_flex_failed}); the recompute falls back to {self.backend}",
                              stacklevel=2)
        if self.backend == "flex":
            try:
                if self._block is None:
                    self._block = flex_block_mask(self.positions, self.n_keys)
                out = _flex_attention(query.device)(query, key, value, block_mask=self._block, scale=scaling, enable_gqa=True)
                return out.transpose(1, 2).contiguous()
            except Exception as exc:  # noqa: BLE001 - any failure of the optional kernel
                _flex_failed = f"{type(exc).__name__}: {exc}"
                self.backend = "dense" if query.device.type == "cuda" else "sdpa"
                warnings.warn(f"FlexAttention failed ({_flex_failed}); the recompute falls back to {self.backend}",
                              stacklevel=2)
        if self.backend == "sdpa":
            if self._pads(query):   # CUDA: padded, so cuDNN's plan is reused by later passes
                out = shape_buckets.bucketed_sdpa(query, key, value, self.additive(query.dtype, padded=True), scaling,
                                                  padded_mask=True)
                return out.transpose(1, 2).contiguous()
            mask = self.additive(query.dtype) if query.is_cuda else self.allowed()   # CPU: as before, bit for bit
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                 enable_gqa=query.shape[1] != key.shape[1])
            return out.transpose(1, 2).contiguous()
        mask = self.float_mask(query.dtype)
        if self.backend == "dense":
            return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)[0]
        return self._grouped(query, key, value, mask, scaling)

    def _pads(self, query: torch.Tensor) -> bool:
        """Run this call's cuDNN attention at padded shapes? (Not where gradients flow: the scratch
        buffers are reused.)"""
        return self.pad and not query.requires_grad

    def _split(self, query, key, value, scaling) -> torch.Tensor:
        """`split`: each group's common key prefix unmasked (`attention_with_lse`), the band after
        it in one flex call, merged by log-sum-exp. query [1, H_q, R, D] -> [1, R, H_q, D]."""
        if self._split_plan is None:
            align = SPLIT_PREFIX_ALIGN if self.pad else FLEX_BLOCK     # few prefix lengths where cuDNN plans them
            groups = split_groups(self.host_positions, align=align)
            rows = torch.arange(0, self.rows, FLEX_BLOCK, device=self.positions.device)           # [nq] first rows
            first_key = group_prefix(self.positions[rows // SPLIT_GROUP_ROWS * SPLIT_GROUP_ROWS], align)  # [nq]
            self._split_plan = groups, flex_block_mask(self.positions, self.n_keys, FLEX_BLOCK, first_key)
        groups, band_mask = self._split_plan
        out, lse = _flex_with_lse(query.device)(query, key, value, band_mask, scaling)  # [1, H_q, R, D], [1, H_q, R]
        if any(p for *_, p in groups):
            out, lse = out.float(), lse.float()
            pad = self._pads(query)
            if pad:   # the prefix calls at fixed shapes: keys of fixed strides, SPLIT_GROUP_ROWS rows each
                keys = shape_buckets.bucket(self.n_keys, shape_buckets.KEY_BUCKET)
                key, value = shape_buckets.padded("key", key, keys), shape_buckets.padded("value", value, keys)
            for a, b, p in groups:
                if p:
                    q, a0 = query[:, :, a:b], a
                    if pad:   # a group of fewer rows (the last) runs the SPLIT_GROUP_ROWS rows ending with it
                        a0 = max(0, b - SPLIT_GROUP_ROWS)   # (those before it see more of the prefix than they
                        q = shape_buckets.padded("query", query[:, :, a0:b], SPLIT_GROUP_ROWS)   # may: dropped)
                    o_pre, lse_pre = attention_with_lse(q, key[:, :, :p], value[:, :, :p], scaling)
                    o_pre, lse_pre = o_pre[:, :, a - a0:b - a0], lse_pre[:, :, a - a0:b - a0]
                    both = torch.logaddexp(lse[:, :, a:b], lse_pre)                             # [1, H_q, r]
                    out[:, :, a:b] = (out[:, :, a:b] * (lse[:, :, a:b] - both).exp()[..., None]
                                      + o_pre.float() * (lse_pre - both).exp()[..., None])
        return out.to(query.dtype).transpose(1, 2).contiguous()

    def _grouped(self, query, key, value, mask, scaling) -> torch.Tensor:
        if self.plan is None:
            groups = max(1, min(4, self.rows // 512))
            self.plan = plan_query_groups(self.positions.cpu(), self.n_keys, groups)
        n_rep = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)          # [1, H_q, K, D]
        out = torch.empty_like(query)                                         # [1, H_q, R, D]
        for a, b, k in self.plan:
            out[:, :, a:b] = F.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, :k], value[:, :, :k], attn_mask=mask[:, :, a:b, :k], scale=scaling)
        return out.transpose(1, 2).contiguous()


_local = threading.local()   # per thread: an engine may run passes on several threads


def current() -> ScatteredQueries | None:
    """This thread's pass in progress, if any (read by the `kvfuse` attention and mask functions)."""
    return getattr(_local, "active", None)


def narrow(positions: torch.Tensor) -> ScatteredQueries | None:
    """Inside a pass whose query set shrinks with depth (`fusion`'s layer plans): the layers from
    now on attend the queries at `positions` [R'] (ascending, a subset of the pass's), with the
    same backend; masks are built anew for them. Returns the new pass (None outside a pass).
    The enclosing `scattered_queries` restores the thread's previous pass on exit."""
    sq = current()
    if sq is None:
        return None
    backend = "flex" if sq.backend == "split" else sq.backend   # no wait for the positions inside a pass
    _local.active = ScatteredQueries(positions, sq.n_keys, backend)
    return _local.active


@contextmanager
def scattered_queries(positions: torch.Tensor, n_keys: int, backend: str | None = None, groups: int | None = None,
                      host_positions: torch.Tensor | None = None):
    """Run the model's `kvfuse` attention over scattered queries at `positions` [R] (ascending)
    for the forward inside. groups: query groups of the `grouped` backend (default: one per 512
    rows, at most 4). host_positions: `positions` on the host, if the caller has them (`split`)."""
    sq = ScatteredQueries(positions, n_keys, backend, host_positions)
    if sq.backend == "grouped" and groups is not None:
        sq.plan = plan_query_groups(positions.cpu(), n_keys, groups)
    previous, _local.active = current(), sq
    try:
        yield sq
    finally:
        _local.active = previous
