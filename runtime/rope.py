"""RoPE re-positioning of stored keys (DESIGN §2, §4).

Keys are stored after RoPE at absolute positions pos_base.. . RoPE angles add, so
moving a chunk by `delta` positions rotates each key by delta * inv_freq:

    R(p + delta) k = R(delta) R(p) k

This holds for the rope types `check_rope_additive` accepts (default, linear,
llama3): their angles are inv_freq * position with a fixed inv_freq.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotation_table(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [T, D] float32, of rotating token t by delta[t] positions ([T] tensor).

    Made once per request, so the per-layer re-rotation (`rotate_keys_`) computes no angles."""
    freqs = delta.float()[:, None] * inv_freq.to(delta.device, torch.float32)[None, :]  # [T, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)                                         # [T, D]
    return angles.cos(), angles.sin()


def rotate_keys_(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys [..., T, D] in place by the table of `rotation_table` (float32 inside)."""
    k = keys.float()
    keys.copy_(k * cos + rotate_half(k) * sin)
    return keys


def rerotate_keys(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate keys [..., T, D] by `delta` positions (an int, or [T] per token).

    Computed in float32 and returned in the keys' dtype. delta == 0 returns keys as is.
    """
    if isinstance(delta, int) and delta == 0:
        return keys
    T = keys.shape[-2]
    delta = torch.as_tensor(delta, dtype=torch.float32, device=keys.device).expand(T)  # [T]
    freqs = delta[:, None] * inv_freq.to(keys.device, torch.float32)[None, :]  # [T, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)                                # [T, D]
    k = keys.float()
    out = k * angles.cos() + rotate_half(k) * angles.sin()
    return out.to(keys.dtype)
