"""One kernel per layer for the layer-wise gather: copy, decode and re-rotate (issue 11 item 1, issue 14).

    plan = GatherPlan.build(kvs, scales, starts, shifts, arena, scale_arena, inv_freq, codec.key_cols)
    if plan is not None:                  # kvs: the entries' slot views [L, 2, H_kv, T, D]; scales: [L, H_kv, W] or None
        plan.launch(fused[l], l)          # fused[l]: [2, H_kv, N + Q, D] in the model dtype

The torch gather (`layerwise.LayerwiseLoad.issue`) queues, per layer, a concatenation per
run of chunks, for a quantised store a converting copy, a scale stack and three scaling
kernels, then seven kernels of re-rotation (float32 copy, halves, products, sum, copy
back): 10-15 launches of ~20-30 us of host time each, and five or six passes over the
layer's K/V in GPU memory. Here one Triton program per (chunk, KV head, block of tokens)
reads the chunk's codes (or model-dtype K/V) from its GPU-pool slot, scales them with the
chunk's scale rows (keys: per channel, plus the channel's offset; values: per token),
rotates the keys by the chunk's position shift (cos/sin of shift x inv_freq, one row per
chunk) and writes the model-dtype K/V into the fused buffer at the chunk's new position.

Arithmetic follows the torch path step for step, so the two agree to the last bit where
the compiler does not contract a multiply and an add (Triton's interpreter, the CPU tests)
and to float32 rounding of the rotation otherwise: every decode product is rounded to the
model dtype as `quant.dequantize_` rounds it (codes and scales are exact in float32, so the
product is too), and the rotation runs in float32 on the decoded key, x1 cos - x2 sin and
x2 cos + x1 sin, as `rope.rotate_keys_` computes it.

`GatherPlan.build` returns None where the kernel cannot run: no Triton; CPU tensors
without Triton's interpreter (`TRITON_INTERPRET=1`, which the tests use); an entry
outside the pool's arena (the cold plan's prefilled front), not contiguous or of another
dtype; head dims that differ, are not a power of two or are below 16. The caller then
keeps the torch path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch gather is the only one
    triton = None


if triton is not None:
    @triton.jit
    def _gather_layer(src, scales, dst, src_off, scale_off, starts, lens, cos, sin, layer,
                      s_kv, s_head, s_tok,
                      H: tl.constexpr, D: tl.constexpr, KC: tl.constexpr, QUANT: tl.constexpr,
                      FP8: tl.constexpr, OFFSETS: tl.constexpr, BLOCK_T: tl.constexpr):
        c = tl.program_id(0)
        h = tl.program_id(1)
        T = tl.load(lens + c)
        t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        keep = t < T
        half = tl.arange(0, D // 2)
        full = tl.arange(0, D)
        # the chunk's slot: [L, 2, H, T, D] contiguous
        base = tl.load(src_off + c) + layer * 2 * H * T * D
        k_rows = base + h * T * D + t[:, None] * D
        v_rows = base + (H + h) * T * D + t[:, None] * D
        m = keep[:, None]
        k1 = tl.load(src + k_rows + half[None, :], mask=m, other=0)
        k2 = tl.load(src + k_rows + D // 2 + half[None, :], mask=m, other=0)
        v = tl.load(src + v_rows + full[None, :], mask=m, other=0)
        out_dtype = dst.dtype.element_ty
        if FP8:
            k1 = k1.to(tl.float8e4nv, bitcast=True)
            k2 = k2.to(tl.float8e4nv, bitcast=True)
            v = v.to(tl.float8e4nv, bitcast=True)
        k1 = k1.to(tl.float32)
        k2 = k2.to(tl.float32)
        v = v.to(tl.float32)
        if QUANT:
            # the chunk's scale rows: [L, H, KC * D + T] contiguous
            W = KC * D + T
            row = tl.load(scale_off + c) + (layer * H + h) * W
            k1 = (k1 * tl.load(scales + row + half).to(tl.float32)[None, :]).to(out_dtype).to(tl.float32)
            k2 = (k2 * tl.load(scales + row + D // 2 + half).to(tl.float32)[None, :]).to(out_dtype).to(tl.float32)
            if OFFSETS:
                k1 = (k1 + tl.load(scales + row + D + half).to(tl.float32)[None, :]).to(out_dtype).to(tl.float32)
                k2 = (k2 + tl.load(scales + row + D + D // 2 + half).to(tl.float32)[None, :]).to(out_dtype) \
                    .to(tl.float32)
            vs = tl.load(scales + row + KC * D + t, mask=keep, other=0).to(tl.float32)
            v = v * vs[:, None]
        k1 = k1.to(out_dtype).to(tl.float32)   # the stored key in the model dtype, as the torch path has it
        k2 = k2.to(out_dtype).to(tl.float32)
        cs = tl.load(cos + c * (D // 2) + half)[None, :]
        sn = tl.load(sin + c * (D // 2) + half)[None, :]
        r1 = k1 * cs + (-k2) * sn
        r2 = k2 * cs + k1 * sn
        out = dst + h * s_head + (tl.load(starts + c) + t)[:, None] * s_tok
        tl.store(out + half[None, :], r1.to(out_dtype), mask=m)
        tl.store(out + D // 2 + half[None, :], r2.to(out_dtype), mask=m)
        tl.store(out + s_kv + full[None, :], v.to(out_dtype), mask=m)


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the GPU: through pinned memory, queued
    on the current stream (a pageable copy waits for the stream to drain first). Off CUDA: t."""
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


def _offsets(tensors: list[torch.Tensor | None], arena: torch.Tensor) -> torch.Tensor | None:
    """[n] int64 element offsets of each tensor's first element inside `arena`, or None when one
    is missing (a chunk the cold plan prefilled has K/V but no scales), lies outside it (another
    allocation) or is not contiguous."""
    base, size, item = arena.data_ptr(), arena.numel() * arena.element_size(), arena.element_size()
    out = []
    for x in tensors:
        if x is None:
            return None
        delta = x.data_ptr() - base
        if not x.is_contiguous() or x.dtype != arena.dtype or delta < 0 or delta >= size or delta % item:
            return None
        out.append(delta // item)
    return torch.tensor(out, dtype=torch.int64)


def in_arena(kv: torch.Tensor | None, arena: torch.Tensor) -> bool:
    """Whether `kv` is a contiguous view of `arena` of its dtype (an entry the kernel can read)."""
    return _offsets([kv], arena) is not None


@dataclass
class GatherPlan:
    """What the kernel needs to gather one request's loaded chunks, per layer (built once)."""

    arena: torch.Tensor          # the GPU pool's arena (codes or model-dtype K/V), any shape
    scale_arena: torch.Tensor | None
    src_off: torch.Tensor        # [n] int64: each entry's slot start in the arena (elements)
    scale_off: torch.Tensor      # [n] int64: its scale rows' start in the scale arena (0 without)
    starts: torch.Tensor         # [n] int32: its first position in the fused buffer
    lens: torch.Tensor           # [n] int32: its tokens
    cos: torch.Tensor            # [n, D/2] float32: cos(shift x inv_freq) of its position shift
    sin: torch.Tensor
    n_kv_heads: int
    head_dim: int
    key_cols: int                # scale columns per channel for keys: 1 (scale) or 2 (+ offset); 0: no codes
    fp8: bool
    block_t: int
    max_len: int                 # the longest entry's tokens (the grid's third axis)

    @staticmethod
    def build(kvs: list[torch.Tensor], scales: list[torch.Tensor] | None, starts: list[int], shifts: list[float],
              arena: torch.Tensor, scale_arena: torch.Tensor | None, inv_freq: torch.Tensor, key_cols: int,
              block_t: int = 64) -> "GatherPlan | None":
        """kvs: each loaded entry's slot view [L, 2, H_kv, T, D]; scales: their [L, H_kv, W] views
        (None: model-dtype K/V); starts: their positions in the fused buffer; shifts: new start -
        stored pos_base (0 for the prefix). None where the kernel can't take them (module doc)."""
        if triton is None or not kvs:
            return None
        if arena.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return None   # Triton compiles for GPUs; on CPU tensors only its interpreter runs it
        L, two, H, _, D = kvs[0].shape
        if D & (D - 1) or D < 16 or any(kv.shape[2] != H or kv.shape[4] != D for kv in kvs):
            return None
        src_off = _offsets(kvs, arena)
        scale_off = torch.zeros(len(kvs), dtype=torch.int64)
        if src_off is not None and scales is not None:
            scale_off = _offsets(scales, scale_arena) if scale_arena is not None else None
        if src_off is None or scale_off is None:
            return None
        device = arena.device
        lens = [kv.shape[3] for kv in kvs]
        # the per-entry tables in one pinned copy (a pageable one would wait for the GPU to drain)
        table = host_to_device(torch.stack((src_off, scale_off, torch.tensor(starts), torch.tensor(lens))), device)
        half = inv_freq.to(device, torch.float32)[: D // 2]
        shift = host_to_device(torch.tensor(shifts, dtype=torch.float32), device)
        angles = shift[:, None] * half[None, :]                                                  # [n, D/2]
        return GatherPlan(arena=arena, scale_arena=scale_arena, src_off=table[0], scale_off=table[1],
                          starts=table[2].int(), lens=table[3].int(),
                          cos=angles.cos().contiguous(), sin=angles.sin().contiguous(), n_kv_heads=H, head_dim=D,
                          key_cols=key_cols if scales is not None else 0, fp8=arena.dtype == torch.float8_e4m3fn,
                          block_t=block_t, max_len=max(lens))

    def launch(self, dst: torch.Tensor, layer: int) -> None:
        """Gather, decode and re-rotate layer `layer` of every entry into dst = fused[layer]
        ([2, H_kv, N + Q, D], model dtype, last dim contiguous), on the current stream."""
        n = self.src_off.numel()
        src = self.arena.view(torch.uint8) if self.fp8 else self.arena
        scales = self.scale_arena if self.scale_arena is not None else dst   # unused without codes
        grid = (n, self.n_kv_heads, triton.cdiv(self.max_len, self.block_t))
        _gather_layer[grid](src, scales, dst, self.src_off, self.scale_off, self.starts, self.lens, self.cos,
                            self.sin, layer, dst.stride(0), dst.stride(1), dst.stride(2),
                            H=self.n_kv_heads, D=self.head_dim, KC=max(self.key_cols, 1), QUANT=self.key_cols > 0,
                            FP8=self.fp8, OFFSETS=self.key_cols == 2, BLOCK_T=self.block_t)
