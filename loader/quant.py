"""Compressed chunk KV: fp8 (e4m3) or int8 codes with bfloat16 scales beside them (DESIGN §2, format v2).

    codec = kv_codec("fp8")                           # "model" | "fp8" | "int8"
    codes, scales = codec.encode(kv)                  # kv [L, 2, H_kv, T, D] -> codes [L, 2, H_kv, T, D] float8_e4m3fn,
                                                      #    scales [L, H_kv, D + T] bfloat16
    kv = codec.decode(codes, scales, torch.bfloat16)  # [L, 2, H_kv, T, D] in the model dtype (the CPU read path)
    dequantize_(dsts, scales_per_layer)               # in place, inside the GPU gather (runtime/layerwise.py)

Scale layout, per chunk (`<chunk_id>.kvs` in the shard, beside `<chunk_id>.kv`), one
bfloat16 row of D + T per (layer, KV head):

    scales[l, h, :D]   keys:   one scale per head-dim channel, over the chunk's T tokens
    scales[l, h, D:]   values: one scale per token, over the head's D channels

so layer l's scales are one contiguous [H_kv, D + T] block, like layer l of the codes:
the pools copy them with the layer. Why these groupings (bench/results/kv_dtype_cpu.md
has the measurement on Qwen2.5-0.5B's KV): keys have outlier channels (the slowly rotating
RoPE pairs carry magnitudes tens of times the rest), so a per-token scale set by the
outliers crushes the other channels; per channel, every channel keeps its own range.
Values have no such channels; their range varies per token instead, so a per-token scale
(KIVI's grouping) reconstructs them better than a per-channel one.

Scales are bfloat16 (float32's range, half its bytes: per-token value scales cost 1/D of
the codes, 1.6% at D = 64 in float32), rounded *up* to a bfloat16 before encoding, so the
codes never exceed the code range and decoding adds no error beyond the codes' own: a
scale's rounding costs < 1% of the range (int8: about one level of 127).

Stored keys are RoPE-rotated at pos_base and quantised in that basis. Re-rotation at serve
time mixes channels d and d + D/2, whose scales differ, so codes are always dequantised
first (`decode`, `dequantize_`) and rotated after.

`model` is no codec: the KV is stored in the model's dtype with no scales (format v1's bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_DTYPES = ("model", "fp8", "int8")


@dataclass(frozen=True)
class KVCodec:
    """How a store holds chunk KV: `name` ("model", "fp8", "int8"), the code dtype (None: the
    model's dtype, no scales), the largest code magnitude and the scale scheme's name (hashed
    into chunk ids, so a change of scheme never reuses chunks of another)."""

    name: str
    code_dtype: torch.dtype | None
    qmax: float
    scheme: str
    scale_dtype: torch.dtype = torch.bfloat16

    @property
    def quantised(self) -> bool:
        return self.code_dtype is not None

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the stored `.kv` tensor (and of the pools' arenas)."""
        return self.code_dtype if self.code_dtype is not None else model_dtype

    def bytes_per_token(self, n_layers: int, n_kv_heads: int, head_dim: int, model_dtype: torch.dtype,
                        chunk_tokens: int) -> float:
        """Stored KV bytes per token (codes + scales), for chunks of `chunk_tokens` tokens."""
        codes = n_layers * 2 * n_kv_heads * head_dim * self.storage_dtype(model_dtype).itemsize
        if not self.quantised:
            return float(codes)
        return codes + n_layers * n_kv_heads * (head_dim / chunk_tokens + 1) * self.scale_dtype.itemsize

    def encode(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """kv [L, 2, H_kv, T, D] (any float dtype, any device) -> (codes [L, 2, H_kv, T, D] in
        code_dtype, scales [L, H_kv, D + T] bfloat16), on kv's device; `model`: (kv, None).
        Non-finite KV raises ValueError (it would decode to garbage)."""
        if not self.quantised:
            return kv, None
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"kv must be [L, 2, H_kv, T, D], got {tuple(kv.shape)}")
        x = kv.float()
        if not torch.isfinite(x).all():
            raise ValueError("chunk KV holds inf or NaN; it cannot be quantised (check the model's dtype)")
        k_amax = x[:, 0].abs().amax(dim=2)                   # [L, H_kv, D]  over tokens
        v_amax = x[:, 1].abs().amax(dim=3)                   # [L, H_kv, T]  over channels
        scales = torch.cat((k_amax, v_amax), dim=-1) / self.qmax  # [L, H_kv, D + T] float32
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: any scale works
        # to bfloat16, rounded up (x (1 + 2^-7) then nearest: >= the float32 scale), then back exactly
        scales = (scales * (1 + 2**-7)).to(self.scale_dtype)
        scales = scales.float()
        D = kv.shape[-1]
        y = torch.stack((x[:, 0] / scales[..., None, :D], x[:, 1] / scales[..., D:, None]), dim=1)
        y = y.clamp_(-self.qmax, self.qmax)                 # e4m3fn has no inf: out of range would be NaN
        if self.code_dtype == torch.int8:
            y = y.round_()
        return y.to(self.code_dtype), scales.to(self.scale_dtype).contiguous()

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """codes [L, 2, H_kv, T, D], scales [L, H_kv, D + T] bfloat16 -> kv [L, 2, H_kv, T, D] in dtype
        (a new tensor; `model`: codes converted to dtype)."""
        if not self.quantised:
            return codes.to(dtype)
        out = codes.to(dtype)
        for l in range(out.shape[0]):  # a layer at a time: no float32 copy of the whole chunk
            dequantize_([out[l]], [scales[l]])
        return out


def dequantize_(dsts: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
    """Scale codes already converted to the model dtype, in place, one layer of several chunks.

    dsts[i]: [2, H_kv, T_i, D] (a view, e.g. of the fused buffer, holding codes converted by the
    gather's copy); scales[i]: [H_kv, D + T_i] bfloat16, the chunk's scales of that layer, on the
    same device. Each element becomes (code * scale) rounded once to the dtype (both factors are
    exact in float32), the same value `KVCodec.decode` gives. Call before re-rotating keys.
    """
    if not dsts:
        return
    D = dsts[0].shape[-1]
    torch._foreach_mul_([d[0] for d in dsts], [s[:, None, :D] for s in scales])  # keys: [H, T, D] * [H, 1, D]
    torch._foreach_mul_([d[1] for d in dsts], [s[:, D:, None] for s in scales])  # values: [H, T, D] * [H, T, 1]


CODECS = {
    "model": KVCodec("model", None, 0.0, "model"),
    "fp8": KVCodec("fp8", torch.float8_e4m3fn, 448.0, "fp8-e4m3/k-channel/v-token/bf16-scales"),
    "int8": KVCodec("int8", torch.int8, 127.0, "int8-sym/k-channel/v-token/bf16-scales"),
}


def kv_codec(name: str | None) -> KVCodec:
    """The codec called `name` (None: "model", a v1 store). Raises ValueError naming the choices."""
    try:
        return CODECS[name or "model"]
    except KeyError:
        raise ValueError(f"unknown KV dtype {name!r}; choose one of {', '.join(KV_DTYPES)}") from None
