"""Compressed chunk KV: fp8 (e4m3) or int8 codes with bfloat16 scales beside them (DESIGN §2, format v2).

    codec = kv_codec("fp8")                           # "model" | "fp8" | "int8"
    codes, scales = codec.encode(kv)                  # kv [L, 2, H_kv, T, D] -> codes [L, 2, H_kv, T, D] float8_e4m3fn,
                                                      #    scales [L, H_kv, W] bfloat16, W = codec.row_width(D, T)
    kv = codec.decode(codes, scales, torch.bfloat16)  # [L, 2, H_kv, T, D] in the model dtype (the CPU read path)
    dequantize_(fused[l, :, :, s:s + n * T], torch.stack([c.scales[l] for c in run], 1), codec.key_offsets)
                                                      # in place, inside the GPU gather (runtime/layerwise.py),
                                                      # per run of n equal-length chunks laid end to end

Scale layout, per chunk (`<chunk_id>.kvs` in the shard, beside `<chunk_id>.kv`), one
bfloat16 row per (layer, KV head):

    scales[l, h, :D]        keys:   one scale per head-dim channel, over the chunk's T tokens
    scales[l, h, D:2D]      keys:   one offset per channel (fp8 only: `key_offsets`)
    scales[l, h, -T:]       values: one scale per token, over the head's D channels

so layer l's scales are one contiguous [H_kv, W] block, like layer l of the codes: the pools
copy them with the layer. Why these groupings (bench/results/kv_dtype_cpu.md has the
measurements on Qwen2.5-0.5B's KV): keys have outlier channels (the slowly rotating RoPE pairs
carry magnitudes tens of times the rest), so a per-token scale set by the outliers crushes the
other channels; per channel, every channel keeps its own range. Those channels also sit far
from zero (10 +- 1, say), and a floating-point code's step grows with the magnitude: e4m3 codes
10 +- 1 in steps of 1, i.e. it loses the part that varies across tokens, the only part attention
sees. fp8 therefore stores keys minus each channel's midrange (the offset): 4.8x lower key error,
4.3x lower error in what varies across tokens (`bench/kv_quant_error.py`). int8 would gain too
(0.25% -> 0.08% key error: a narrower range is a finer step), but its first scheme already met
the accuracy budget and its measured results stand for it, so it keeps no offsets. Values have no such channels; their
range varies per token instead, so a per-token scale (KIVI's grouping) reconstructs them better
than a per-channel one, and centring them gains nothing.

Scales are bfloat16 (float32's range, half its bytes: per-token value scales cost 1/D of
the codes, 1.6% at D = 64 in float32), rounded *up* to a bfloat16 before encoding, so the
codes never exceed the code range and decoding adds no error beyond the codes' own: a
scale's rounding costs < 1% of the range (int8: about one level of 127). Offsets are rounded
to bfloat16 before the keys are centred on them, so they too add no error.

Stored keys are RoPE-rotated at pos_base and quantised in that basis. Re-rotation at serve
time mixes channels d and d + D/2, whose scales differ, so codes are always dequantised
first (`decode`, `dequantize_`) and rotated after.

`model` is no codec: the KV is stored in the model's dtype with no scales (format v1's bytes).
Stores keep working across a change of scheme: the manifest names the scheme its chunks were
encoded with and `kv_codec(name, scheme)` returns that codec (`LEGACY`), so an fp8 store built
before the key offsets still reads, while new builds encode with the current scheme.
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
    key_offsets: bool = False  # keys stored as (k - offset) / scale, one bfloat16 offset per channel

    @property
    def quantised(self) -> bool:
        return self.code_dtype is not None

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the stored `.kv` tensor (and of the pools' arenas)."""
        return self.code_dtype if self.code_dtype is not None else model_dtype

    def chunk_bytes(self, n_layers: int, n_kv_heads: int, head_dim: int, model_dtype: torch.dtype,
                    n_tokens: int) -> int:
        """Stored KV bytes of a chunk of `n_tokens` tokens: codes (or model-dtype K/V) + their
        scale rows [L, H_kv, key_cols * D + T] (0 for model-dtype KV)."""
        codes = n_layers * 2 * n_kv_heads * n_tokens * head_dim * self.storage_dtype(model_dtype).itemsize
        return codes + n_layers * n_kv_heads * self.row_width(head_dim, n_tokens) * self.scale_dtype.itemsize

    def bytes_per_token(self, n_layers: int, n_kv_heads: int, head_dim: int, model_dtype: torch.dtype,
                        chunk_tokens: int) -> float:
        """Stored KV bytes per token (codes + scales), for chunks of `chunk_tokens` tokens."""
        return self.chunk_bytes(n_layers, n_kv_heads, head_dim, model_dtype, chunk_tokens) / chunk_tokens

    @property
    def key_cols(self) -> int:
        """Columns per head-dim channel a scale row gives the keys: 1 (scale) or 2 (scale, offset)."""
        return 2 if self.key_offsets else 1

    def row_width(self, head_dim: int, n_tokens: int) -> int:
        """Width of a chunk's scale row [.., key_cols * D + T] (0 for model-dtype KV)."""
        return self.key_cols * head_dim + n_tokens if self.quantised else 0

    def encode(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """kv [L, 2, H_kv, T, D] (any float dtype, any device) -> (codes [L, 2, H_kv, T, D] in
        code_dtype, scales [L, H_kv, key_cols * D + T] bfloat16), on kv's device; `model`: (kv, None).
        Non-finite KV raises ValueError (it would decode to garbage)."""
        if not self.quantised:
            return kv, None
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"kv must be [L, 2, H_kv, T, D], got {tuple(kv.shape)}")
        x = kv.float()
        if not torch.isfinite(x).all():
            raise ValueError("chunk KV holds inf or NaN; it cannot be quantised (check the model's dtype)")
        keys = x[:, 0]                                        # [L, H_kv, T, D]
        if self.key_offsets:  # each channel's midrange, exact in bfloat16: the codes hold what varies
            offsets = ((keys.amax(dim=2) + keys.amin(dim=2)) / 2).to(self.scale_dtype)  # [L, H_kv, D]
            keys = keys - offsets.float()[..., None, :]
        k_scales = _scale_for(keys.abs().amax(dim=2), self.qmax, self.scale_dtype)      # [L, H_kv, D]  over tokens
        v_scales = _scale_for(x[:, 1].abs().amax(dim=3), self.qmax, self.scale_dtype)   # [L, H_kv, T]  over channels
        y = torch.stack((keys / k_scales.float()[..., None, :], x[:, 1] / v_scales.float()[..., None]), dim=1)
        y = y.clamp_(-self.qmax, self.qmax)                 # e4m3fn has no inf: out of range would be NaN
        if self.code_dtype == torch.int8:
            y = y.round_()
        parts = (k_scales, offsets, v_scales) if self.key_offsets else (k_scales, v_scales)
        return y.to(self.code_dtype), torch.cat(parts, dim=-1).contiguous()

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """codes [L, 2, H_kv, T, D], scales [L, H_kv, key_cols * D + T] bfloat16 -> kv [L, 2, H_kv, T, D]
        in dtype (a new tensor; `model`: codes converted to dtype)."""
        if not self.quantised:
            return codes.to(dtype)
        out = codes.to(dtype)
        for l in range(out.shape[0]):  # a layer at a time: no float32 copy of the whole chunk
            dequantize_(out[l], scales[l][:, None], self.key_offsets)
        return out


def _scale_for(amax: torch.Tensor, qmax: float, dtype: torch.dtype) -> torch.Tensor:
    """Scales (amax / qmax) in `dtype`, rounded *up* (x (1 + 2^-7), then nearest: >= the float32
    scale), so codes never leave the code range; an all-zero group gets 1 (any scale works)."""
    scales = amax / qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return (scales * (1 + 2**-7)).to(dtype)


def dequantize_(kv: torch.Tensor, rows: torch.Tensor, key_offsets: bool) -> None:
    """Scale codes already converted to the model dtype, in place: n chunks of T tokens each,
    laid end to end (three kernels per layer, however many chunks).

    kv: [2, H_kv, n * T, D] (e.g. a run of equal-length chunks in the fused buffer's layer l,
    holding the codes the gather's copy converted); rows: [H_kv, n, key_cols * D + T] bfloat16,
    the chunks' scale rows of that layer in the same order (`torch.stack(.., dim=1)`).
    Keys become code * scale (+ offset), values code * scale, each product rounded to kv's
    dtype (both factors are exact in float32): the value `KVCodec.decode` gives. No index
    tensor and no [H, N, D] scale tensor is made: the scales broadcast over the chunk's tokens
    (keys) or channels (values). Call before re-rotating keys.
    """
    H, n, W = rows.shape
    D = kv.shape[-1]
    T = W - (2 if key_offsets else 1) * D
    if kv.shape[2] != n * T:
        raise ValueError(f"kv holds {kv.shape[2]} tokens; {n} scale rows of {T} tokens need {n * T}")
    keys = kv[0].view(H, n, T, D)
    keys.mul_(rows[:, :, None, :D])                       # [H, n, T, D] * [H, n, 1, D]: per chunk and channel
    if key_offsets:
        keys.add_(rows[:, :, None, D:2 * D])              # + the channel's offset
    kv[1].view(H, n, T, D).mul_(rows[:, :, W - T:, None])  # [H, n, T, D] * [H, n, T, 1]: per token


CODECS = {
    "model": KVCodec("model", None, 0.0, "model"),
    "fp8": KVCodec("fp8", torch.float8_e4m3fn, 448.0, "fp8-e4m3/k-channel-centred/v-token/bf16-scales", key_offsets=True),
    "int8": KVCodec("int8", torch.int8, 127.0, "int8-sym/k-channel/v-token/bf16-scales"),
}
# schemes stores were built with before the current one: decodable, never written
LEGACY = {c.scheme: c for c in (KVCodec("fp8", torch.float8_e4m3fn, 448.0, "fp8-e4m3/k-channel/v-token/bf16-scales"),)}


def kv_codec(name: str | None, scheme: str | None = None) -> KVCodec:
    """The codec called `name` (None: "model", a v1 store); with `scheme` (a store manifest's
    kv_scheme), the codec of that scheme, current or legacy. Raises ValueError naming the
    choices, or for a scheme this version cannot decode."""
    try:
        codec = CODECS[name or "model"]
    except KeyError:
        raise ValueError(f"unknown KV dtype {name!r}; choose one of {', '.join(KV_DTYPES)}") from None
    if scheme is None or scheme == codec.scheme:
        return codec
    legacy = LEGACY.get(scheme)
    if legacy is None or legacy.name != codec.name:
        raise ValueError(f"this kvfuse cannot decode {name} KV of scheme {scheme!r} (it knows {codec.scheme!r}"
                         f"{''.join(', ' + repr(s) for s, c in LEGACY.items() if c.name == codec.name)})")
    return legacy
