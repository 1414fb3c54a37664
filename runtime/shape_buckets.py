"""Attention calls at a few padded shapes, so that cuDNN builds each of its plans once (issue 11).

    out = bucketed_sdpa(query, key, value, mask, scale)     # [B, H_q, R, D], as SDPA with `mask` gives

cuDNN's attention builds an execution plan for every new shape and strides of its inputs and
caches it. On the H200 (torch 2.11, `bench/dev/plan_cost_probe.py`,
`bench/results/plan_cost_h200.json`) a new plan costs ~45 ms for an unmasked call and 0.7-1.2 s
for a call with a mask (cuDNN compiles a kernel for it), against 0.1-1 ms for the call itself.
The benchmark replays one request, so every plan was built by its warm-up; a server is sent
new question and context lengths all the time, and each new length made the fused request
pay for new plans: 0.5-1.7 s on top of its ~0.3 s (`bench/dev/shape_probe.py`).

So on CUDA the masked calls (question probes, repair passes) run with their query rows padded
to a multiple of ROW_BUCKET and their keys to a multiple of KEY_BUCKET, and the `split`
backend's unmasked prefix calls read keys of fixed strides: the keys and values are copied
into a per-thread scratch buffer of the padded length (~40 us a layer at 16k tokens on the
H200). Padded keys are masked out, padded query rows see key 0 only (no row is all masked)
and are dropped. A process then builds plans for a few shapes per context length bucket
and reuses them. `KVFUSE_SHAPE_BUCKETS=0` turns the padding off (for measurements); the CPU
does not pad (no plans there) unless `KVFUSE_SHAPE_BUCKETS=all` (its tests).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROW_BUCKET = 128     # query rows padded to a multiple of this
KEY_BUCKET = 1024    # keys padded to a multiple of this (<= 6% more keys at 16k)


def enabled(tensor: torch.Tensor) -> bool:
    """Pad the attention calls on `tensor`'s device? KVFUSE_SHAPE_BUCKETS: "1" (default) on CUDA,
    "0" never, "all" on every device (the CPU tests of the padded paths). ValueError otherwise."""
    return enabled_on(tensor.device)


def enabled_on(device: torch.device | str) -> bool:
    """`enabled` for tensors on `device`."""
    setting = os.environ.get("KVFUSE_SHAPE_BUCKETS", "1")
    if setting not in ("0", "1", "all"):
        raise ValueError(f"KVFUSE_SHAPE_BUCKETS={setting!r}: give 1 (pad on CUDA, the default), 0 or all")
    device = torch.device(device)
    return setting == "all" or (setting == "1" and device.type == "cuda" and _plans_per_shape(device))


def _plans_per_shape(device: torch.device) -> bool:
    """Does SDPA on this GPU run cuDNN's attention, which plans per shape? torch prefers it from
    Hopper (compute capability 9) on; older GPUs run flash / memory-efficient kernels, which plan
    nothing, so padding would only add work (and a masked call with grouped heads there would fall
    back to the math kernel)."""
    return torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(device)[0] >= 9


# buffers whose rows past what their views use are zeroed, by the address of their storage (a slice
# taken under inference mode has no `_base`, but shares the storage): attention reads padded keys there
_zeroed = weakref.WeakValueDictionary()


def zeroed_beyond(buffer: torch.Tensor) -> torch.Tensor:
    """Register `buffer` [..., T, D] (allocated with `bucket(n, KEY_BUCKET)` rows for n used, those
    past the used ones zeroed): `padded` then widens views of it in place instead of copying them, while the caller
    keeps `buffer` itself alive (the registry holds it weakly). Returns it."""
    _zeroed[buffer.untyped_storage().data_ptr()] = buffer
    return buffer


def _in_place(x: torch.Tensor, length: int) -> torch.Tensor | None:
    """x [B, H, n, D] widened to `length` rows of the registered buffer it views, or None (not a view
    of one, or the widened view would not be what the scratch gives: rows 0..length-1 of each head
    (the buffer's rows, length == its T), strides that depend on `length` alone)."""
    base = _zeroed.get(x.untyped_storage().data_ptr())
    if base is None or not base.is_contiguous() or base.dtype != x.dtype:
        return None
    b, h, n, d = x.shape
    head = length * d
    if (length < n or length != base.shape[-2] or base.shape[-1] != d or x.stride(3) != 1 or x.stride(2) != d
            or x.stride(1) != head or (b > 1 and x.stride(0) != h * head)
            or (x.storage_offset() - base.storage_offset()) % head):
        return None
    return x.as_strided((b, h, length, d), (h * head, head, d, 1), x.storage_offset())


def bucket(n: int, step: int) -> int:
    """n rounded up to a multiple of step (at least one step)."""
    return max(step, -(-n // step) * step)


class _Scratch(threading.local):
    """Per thread: the last padded buffers by role ("key", "value", "query"), reused while they fit."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}


_scratch = _Scratch()


def padded(role: str, x: torch.Tensor, length: int) -> torch.Tensor:
    """x [B, H, n, D] as [B, H, length, D] (length >= n) of fixed strides (they depend on `length`
    alone): where x views the first rows of each head of a registered buffer (`zeroed_beyond`) of
    `length` rows, that buffer's rows in place (rows n.. hold zeros or other finite K/V: they are
    masked); else x copied into the first n of a contiguous per-thread buffer, reused for the same
    shape (and inference mode), its rows after n zeroed on every call."""
    b, h, n, d = x.shape
    view = _in_place(x, length) if role != "query" else None
    if view is not None:                           # a view of a registered buffer: no copy
        return view
    buf = _scratch.buffers.get(role)
    if (buf is None or buf.shape != (b, h, length, d) or buf.dtype != x.dtype or buf.device != x.device
            or buf.is_inference() != torch.is_inference_mode_enabled()):   # (an inference tensor: read-only outside)
        buf = torch.zeros((b, h, length, d), dtype=x.dtype, device=x.device)
        _scratch.buffers[role] = buf
    buf[:, :, :n].copy_(x)
    buf[:, :, n:].zero_()   # what an earlier call left there (a NaN would make every row NaN: 0 * NaN)
    return buf


def pad_mask(mask: torch.Tensor, rows: int, keys: int) -> torch.Tensor:
    """mask [b, h, R, K] (bool: True = sees; or additive float) -> [b, h, rows, keys]: padded keys
    hidden from every row (additive: the dtype's min), padded rows see key 0 only."""
    b, h, r, k = mask.shape
    if mask.dtype == torch.bool:
        out = torch.zeros((b, h, rows, keys), dtype=torch.bool, device=mask.device)
        out[..., r:, 0] = True
    else:
        out = torch.full((b, h, rows, keys), torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
        out[..., r:, 0] = 0
    out[..., :r, :k] = mask
    return out


def bucketed_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                  scale: float, padded_mask: bool = False) -> torch.Tensor:
    """SDPA of query [B, H_q, R, D] over key/value [B, H_kv, K, D] with `mask` (4-D, broadcasting to
    [b, h, R, K], bool or additive; padded_mask: already [b, h, R', K'] at the padded shape) at padded shapes:
    -> [B, H_q, R, D], the rows SDPA would give unpadded (same values up to summation order)."""
    r, k = query.shape[2], key.shape[2]
    rows, keys = (mask.shape[-2], mask.shape[-1]) if padded_mask else (bucket(r, ROW_BUCKET), bucket(k, KEY_BUCKET))
    q = padded("query", query, rows)
    kk, vv = padded("key", key, keys), padded("value", value, keys)
    # a mask that broadcasts over rows or keys ([b, h, 1, K], [b, h, R, 1]) is made whole first
    m = mask if padded_mask else pad_mask(mask.expand(*mask.shape[:2], r, k), rows, keys)
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=scale, enable_gqa=q.shape[1] != kk.shape[1])
    return out[:, :, :r]


# A decode step attends one query over a cache one key longer than the last step's: to cuDNN a new
# shape every token (~65 ms a plan on the H200 against ~0.1 ms for the call; plan_cost_h200.json).
# Flash attention (and the memory-efficient kernel) plans nothing, so decode steps run on them.
NO_PLAN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_kernels(query: torch.Tensor):
    """The SDPA backends for a call of `query` [B, H, q, D] outside the padded paths: for a decode
    step (q == 1) where padding is on (`enabled`) only those that build no per-shape plan;
    elsewhere SDPA's own choice."""
    if query.shape[2] == 1 and enabled(query):
        return sdpa_kernel(NO_PLAN_BACKENDS)
    return contextlib.nullcontext()
