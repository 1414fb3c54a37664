"""Attention of the recompute pass: scattered queries over the fused cache (DESIGN §4).

    with scattered_queries(positions, n_keys):        # [S + Q] absolute positions, ascending
        lm.model(input_ids=..., position_ids=positions[None], **cache_kwargs(lm.model, cache), attention_mask=None)

The recomputed context tokens sit at scattered positions and the question at the
end; the query at position p sees the keys at positions <= p. Inside
`scattered_queries` the model's `kvfuse` attention (runtime/attention.py) hands
the pass's queries to `ScatteredQueries.attend` instead of SDPA with a dense
float mask, and the `kvfuse` mask function returns no mask at all. Backends:

* `flex` (CUDA's default): FlexAttention with a block mask built from the
  positions: key blocks wholly after a query block's last position are
  skipped, blocks wholly before its first run without the mask function, only
  the diagonal band evaluates `k <= qpos[q]`; grouped-query heads read their
  shared KV head (`enable_gqa`), no `repeat_kv`. Built once per pass (a few
  small tensor ops on the device, no host sync) and shared by every layer.
* `sdpa` (the CPU's default): SDPA with one boolean mask [S+Q, K] per pass,
  shared by every layer, and `enable_gqa` instead of `repeat_kv`.
* `dense`: the former path, `repeat_kv` + SDPA with a float mask: the reference.
* `grouped`: queries split into groups by position, each attending only the key
  prefix it can see (`plan_query_groups`); needs the positions on the host.

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

BACKENDS = ("flex", "sdpa", "dense", "grouped")
# The CUDA default, chosen by `python3 -m kvfuse.bench.attention` (per layer, Llama-3-8B, r = 0.15):
# issue 11 measured FlexAttention 1.46 ms against SDPA with a float mask 2.02 ms at 16k on an H200.
CUDA_BACKEND = "flex"
FLEX_BLOCK = 128
SMALL_PASS_ROWS = 512         # passes of at most this many queries (question probes) ...
SMALL_PASS_BACKEND = "sdpa"   # ... use this on CUDA: kvfuse's probe 136 -> 80 ms at 16k (bench/results/small_pass_h200.md)
_flex_failed: str | None = None     # the error that made flex unusable in this process
_flex_compiled = None


def default_backend(device: torch.device | str, rows: int | None = None) -> str:
    """The backend a pass of `rows` queries on `device` uses: $KVFUSE_RECOMPUTE_ATTENTION, else
    on CUDA flex, or $KVFUSE_SMALL_PASS_ATTENTION (SMALL_PASS_BACKEND) for a pass of at most
    SMALL_PASS_ROWS ($KVFUSE_SMALL_PASS_ROWS) queries (a question probe: flex parallelises over query blocks, so a few
    rows over 16k keys leave most of the GPU idle); sdpa elsewhere."""
    name = os.environ.get("KVFUSE_RECOMPUTE_ATTENTION")
    if name:
        if name not in BACKENDS:
            raise ValueError(f"KVFUSE_RECOMPUTE_ATTENTION={name!r}: choose one of {', '.join(BACKENDS)}")
        return name
    small = os.environ.get("KVFUSE_SMALL_PASS_ATTENTION", SMALL_PASS_BACKEND)
    if small not in BACKENDS:
        raise ValueError(f"KVFUSE_SMALL_PASS_ATTENTION={small!r}: choose one of {', '.join(BACKENDS)}")
    limit = int(os.environ.get("KVFUSE_SMALL_PASS_ROWS", SMALL_PASS_ROWS))
    if torch.device(device).type == "cuda" and rows is not None and rows <= limit and small != "flex":
        return small
    if torch.device(device).type == "cuda":
        return "dense" if CUDA_BACKEND == "flex" and _flex_failed is not None else CUDA_BACKEND
    return "sdpa"


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


def flex_block_mask(positions: torch.Tensor, n_keys: int, block: int = FLEX_BLOCK):
    """FlexAttention BlockMask for queries at `positions` [R] (ascending in a recompute pass;
    any order works) over keys 0..n_keys-1.

    Query block i (rows i*block..) sees key block j fully if j's last key <= the block's
    lowest position, partly (mask_mod decides) if j's first key <= its highest position."""
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

    def blocks(m: torch.Tensor):
        num = m.sum(-1, dtype=torch.int32)[None, None]                          # [1, 1, nq]
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
        return num, order                                                     # listed blocks first, in order

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= pos[q_idx]

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


class ScatteredQueries:
    """The queries of one recompute pass: positions [R] (ascending) over `n_keys` keys.

    The masks each backend needs are built on first use and shared by every layer."""

    def __init__(self, positions: torch.Tensor, n_keys: int, backend: str | None = None):
        self.positions = positions                     # [R] int64, on the model's device
        self.rows, self.n_keys = positions.numel(), n_keys
        self.backend = backend or default_backend(positions.device, self.rows)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown recompute attention {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        self._bool: torch.Tensor | None = None
        self._float: dict = {}
        self._block = None
        self.plan: list[tuple[int, int, int]] | None = None

    def allowed(self) -> torch.Tensor:
        """[1, 1, R, K] bool: query row r sees key k iff k <= positions[r]."""
        if self._bool is None:
            keys = torch.arange(self.n_keys, device=self.positions.device)
            self._bool = (keys[None, :] <= self.positions[:, None])[None, None]
        return self._bool

    def row_mask(self, rows: slice) -> torch.Tensor:
        """[1, 1, r, K] bool mask of the recorded rows (for the attention recorder)."""
        keys = torch.arange(self.n_keys, device=self.positions.device)
        return (keys[None, :] <= self.positions[rows][:, None])[None, None]

    def float_mask(self, dtype) -> torch.Tensor:
        """[1, 1, R, K] additive mask (0 / dtype min), as the `dense` path gives SDPA."""
        if dtype not in self._float:
            allowed = self.allowed()
            self._float[dtype] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return self._float[dtype]

    def attend(self, module, query, key, value, scaling) -> torch.Tensor:
        """query [1, H_q, R, D], key/value [1, H_kv, K, D] -> output [1, R, H_q, D]."""
        global _flex_failed
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
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.allowed(), scale=scaling,
                                                 enable_gqa=query.shape[1] != key.shape[1])
            return out.transpose(1, 2).contiguous()
        mask = self.float_mask(query.dtype)
        if self.backend == "dense":
            return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)[0]
        return self._grouped(query, key, value, mask, scaling)

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
    _local.active = ScatteredQueries(positions, sq.n_keys, sq.backend)
    return _local.active


@contextmanager
def scattered_queries(positions: torch.Tensor, n_keys: int, backend: str | None = None, groups: int | None = None):
    """Run the model's `kvfuse` attention over scattered queries at `positions` [R] (ascending)
    for the forward inside. groups: query groups of the `grouped` backend (default: one per 512
    rows, at most 4)."""
    sq = ScatteredQueries(positions, n_keys, backend)
    if sq.backend == "grouped" and groups is not None:
        sq.plan = plan_query_groups(positions.cpu(), n_keys, groups)
    previous, _local.active = current(), sq
    try:
        yield sq
    finally:
        _local.active = previous
