"""Compressed chunk KV: fp8 (e4m3) or int8 codes with bfloat16 scales beside them (DESIGN §2, format v2).

    codec = kv_codec("fp8")                           # "model" | "fp8" | "int8"
    codes, scales = codec.encode(kv)                  # kv [L, 2, H_kv, T, D] -> codes [L, 2, H_kv, T, D] float8_e4m3fn,
                                                      #    scales [L, H_kv, D + T] bfloat16
    kv = codec.decode(codes, scales, torch.bfloat16)  # [L, 2, H_kv, T, D] in the model dtype (the CPU read path)
    k_index, v_index = scale_index([T_0, T_1, ...], D, device)   # once per request: where each token's scales lie
    dequantize_(fused[l, :, :, :N], torch.cat([s[l] for s in chunk_scales], 1), k_index, v_index)
                                                      # in place, inside the GPU gather (runtime/layerwise.py)

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
        index = scale_index([codes.shape[3]], codes.shape[4], codes.device)
        for l in range(out.shape[0]):  # a layer at a time: no float32 copy of the whole chunk
            dequantize_(out[l], scales[l], *index)
        return out


def scale_index(n_tokens: list[int], head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token's scales lie when chunks of n_tokens[i] tokens are laid end to end, and
    so are their scale rows ([H_kv, sum_i (D + T_i)], the same chunk order): returns k_index
    [N, D] (its chunk's key-channel scales) and v_index [N] (its own value scale), int64, N =
    sum(n_tokens). Made once per request; `dequantize_` takes them."""
    D = head_dim
    lens = torch.tensor(n_tokens, dtype=torch.long)
    row_starts = torch.cumsum(lens + D, 0) - (lens + D)                         # [n] where chunk i's row starts
    token_starts = torch.cumsum(lens, 0) - lens                                 # [n]
    base = torch.repeat_interleave(row_starts, lens)                            # [N]
    within = torch.arange(int(lens.sum())) - torch.repeat_interleave(token_starts, lens)  # [N] index in its chunk
    k_index = base[:, None] + torch.arange(D)[None, :]                          # [N, D]
    v_index = base + D + within                                                 # [N]
    return k_index.to(device), v_index.to(device)


def dequantize_(kv: torch.Tensor, scales: torch.Tensor, k_index: torch.Tensor, v_index: torch.Tensor) -> None:
    """Scale codes already converted to the model dtype, in place: one layer of the chunks laid
    end to end (a few kernels, however many chunks).

    kv: [2, H_kv, N, D] (e.g. the fused buffer's layer l over the prefix and chunks, holding the
    codes the gather's copy converted); scales: [H_kv, sum_i (D + T_i)] bfloat16, the chunks'
    scale rows of that layer concatenated in the same order; k_index, v_index: `scale_index`.
    Each element becomes (code * scale) rounded once to kv's dtype (both factors are exact in
    float32), the value `KVCodec.decode` gives. Call before re-rotating keys.
    """
    kv[0].mul_(scales[:, k_index])              # keys:   [H, N, D] * [H, N, D] (per chunk and channel)
    kv[1].mul_(scales[:, v_index].unsqueeze(-1))  # values: [H, N, D] * [H, N, 1] (per token)


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
