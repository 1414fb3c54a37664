"""Dev tool (issue 11): which attention calls pay a one-off cost per new shape (cuDNN graph
builds, recompiles), and what the shape-free kernels cost in steady state. Llama-3-8B heads.

    python3 bench/dev/plan_cost_probe.py --out DIR
Not a product path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvfuse.runtime import recompute_attention as ra

DEV, DT, HQ, HKV, D = "cuda", torch.bfloat16, 32, 8, 128
SCALE = D ** -0.5


def ms(fn, reps=1):
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(round((time.perf_counter() - t0) * 1e3, 3))
    return out


def steady(fn, reps=20):
    fn(), fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return round(s.elapsed_time(e) / reps, 4)


def qkv(r, k, t=None):
    q = torch.randn(1, HQ, r, D, device=DEV, dtype=DT)
    buf = torch.randn(2, 1, HKV, t or k, D, device=DEV, dtype=DT)
    return q, buf[0][:, :, :k], buf[1][:, :, :k]


def positions(r, k, gen):
    return torch.sort(torch.randperm(k - 64, generator=gen)[:r - 32]).values.tolist() + list(range(k - 32, k))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    gen = torch.Generator().manual_seed(0)

    def sdpa_mask(r, k):
        q, kk, v = qkv(r, k)
        pos = torch.tensor(positions(r, k, gen), device=DEV)
        sq = ra.ScatteredQueries(pos, k, "sdpa")
        m = sq.additive(DT)
        return lambda: F.scaled_dot_product_attention(q, kk, v, attn_mask=m, scale=SCALE, enable_gqa=True)

    res["sdpa_mask_new_shapes"] = [{"rows": r, "keys": k, "ms": ms(sdpa_mask(r, k), 3)}
                                   for r, k in ((840, 16416), (840, 16417), (841, 16417), (777, 16500))]
    print("sdpa_mask", res["sdpa_mask_new_shapes"], flush=True)

    def cudnn_lse(r, p, t):
        q, kk, v = qkv(r, p, t)
        return lambda: ra.attention_with_lse(q, kk, v, SCALE)

    res["cudnn_lse_strides"] = [{"rows": 512, "prefix": 8192, "buffer_keys": t, "ms": ms(cudnn_lse(512, 8192, t), 3)}
                                for t in (16416, 16417, 16500, 16416)]
    print("cudnn_lse strides", res["cudnn_lse_strides"], flush=True)

    def flash_lse(r, p, t):
        q, kk, v = qkv(r, p, t)
        return lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, kk, v, 0.0, False, False, scale=SCALE)

    try:
        q, kk, v = qkv(512, 8192, 16416)
        o_f, lse_f = torch.ops.aten._scaled_dot_product_flash_attention(q, kk, v, 0.0, False, False, scale=SCALE)[:2]
        o_c, lse_c = ra.attention_with_lse(q, kk, v, SCALE)
        res["flash_vs_cudnn_err"] = {"out": (o_f.float() - o_c.float()).abs().max().item(),
                                     "lse": (lse_f.float() - lse_c.float()).abs().max().item()}
        res["flash_lse_new_shapes"] = [{"rows": r, "prefix": p, "buffer_keys": t, "ms": ms(flash_lse(r, p, t), 3)}
                                       for r, p, t in ((512, 8192, 16416), (512, 8192, 16417), (300, 4100, 16417))]
        res["prefix_steady_ms"] = {f"{name}_{r}x{p}": steady(f(r, p, 16416))
                                   for name, f in (("cudnn", cudnn_lse), ("flash", flash_lse))
                                   for r, p in ((512, 4096), (512, 8192), (512, 15360), (128, 8192))}
    except Exception as exc:  # noqa: BLE001
        res["flash_error"] = f"{type(exc).__name__}: {exc}"
    print("flash", {k: res.get(k) for k in ("flash_vs_cudnn_err", "flash_lse_new_shapes", "prefix_steady_ms", "flash_error")}, flush=True)

    def split_attend(r, k, backend="split"):
        q, kk, v = qkv(r, k)
        pos = torch.tensor(positions(r, k, gen), device=DEV)
        def f():
            sq = ra.ScatteredQueries(pos, k, backend, host_positions=pos.cpu())
            sq.attend(None, q, kk, v, SCALE)
        return f

    res["split_new_shapes"] = [{"rows": r, "keys": k, "ms": ms(split_attend(r, k), 3)}
                               for r, k in ((2490, 16416), (2490, 16417), (2491, 16417), (2300, 15000))]
    print("split", res["split_new_shapes"], flush=True)
    res["flex_small_new_shapes"] = [{"rows": r, "keys": k, "ms": ms(split_attend(r, k, "flex"), 3)}
                                    for r, k in ((840, 16416), (841, 16417), (777, 15000))]
    print("flex small", res["flex_small_new_shapes"], flush=True)
    # steady state per layer for an ~840-row pass at 16k and 1,670 at 32k: what each shape-free option costs
    for r, k in ((840, 16416), (1670, 32800)):
        row = {"sdpa_cudnn_mask": steady(sdpa_mask(r, k))}
        for name, be in (("flex", "flex"), ("split", "split")):
            row[name] = steady(split_attend(r, k, be))
        q, kk, v = qkv(r, k)
        m = ra.ScatteredQueries(torch.tensor(positions(r, k, gen), device=DEV), k, "sdpa").additive(DT)
        for name, be in (("efficient_mask", SDPBackend.EFFICIENT_ATTENTION),):
            try:
                with sdpa_kernel(be):
                    row[name] = steady(lambda: F.scaled_dot_product_attention(q, kk, v, attn_mask=m, scale=SCALE,
                                                                              enable_gqa=True))
            except Exception as exc:  # noqa: BLE001
                row[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        res[f"steady_{r}x{k}"] = row
        print("steady", r, k, row, flush=True)
    # the full prefill's attention: causal SDPA at new lengths (which backend, and does it pay per shape?)
    res["causal_new_lengths"] = []
    for t in (16416, 16417, 16500):
        q = torch.randn(1, HQ, t, D, device=DEV, dtype=DT)
        k = torch.randn(1, HKV, t, D, device=DEV, dtype=DT)
        res["causal_new_lengths"].append({"len": t, "ms": ms(lambda: F.scaled_dot_product_attention(
            q, k, k, is_causal=True, scale=SCALE, enable_gqa=True), 3)})
    print("causal", res["causal_new_lengths"], flush=True)
    (out / "plan_cost.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
