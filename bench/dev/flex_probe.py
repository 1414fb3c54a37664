"""Dev probe (issue 11 item 1): how fast can the recompute's scattered-query attention run?

    python3 bench/dev/flex_probe.py --contexts 16384,32768 --ratio 0.15 --out DIR

One Llama-3-8B layer (32 query heads, 8 KV heads, head dim 128, bf16), the same
queries as `bench/attention.py` (ratio x context sorted random positions plus a
32-token question at the end). Times FlexAttention as the product runs it
(`torch.compile(flex_attention, dynamic=True)`, default kernel options) against
variants: a static-shape compile, explicit kernel options (tile sizes, warps,
pipeline stages), TMA, max-autotune, the grouped-query heads packed into the query
rows, the product's own call (`ScatteredQueries.attend`) by input layout
(contiguous or views of a larger buffer, as the fused cache hands them over), and, as a reference for what a Hopper-tuned kernel does on the same rows,
cuDNN attention with no mask at all (twice the work: every key for every row).
Writes flex_probe.json under --out and prints a table. Not a product path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvfuse.bench.attention import D, H_KV, H_Q, event_times, scattered_problem
from kvfuse.runtime.recompute_attention import flex_block_mask


def events(fn, reps: int) -> float:
    """Median ms of fn over reps (CUDA events), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return statistics.median(event_times(fn, reps))


def reference(positions, q, k, v, rows: int = 256) -> torch.Tensor:
    n_rep = H_Q // H_KV
    kk, vv = k.float().repeat_interleave(n_rep, 1), v.float().repeat_interleave(n_rep, 1)
    keys = torch.arange(k.shape[2], device=q.device)
    mask = keys[None, :] <= positions[:rows, None]
    return F.scaled_dot_product_attention(q[:, :, :rows].float(), kk, vv, attn_mask=mask[None, None])


VARIANTS = {   # name: (compile kwargs, kernel_options, block, packed)
    "product: dynamic shapes, default options": ({"dynamic": True}, None, 128, False),
    "static shapes": ({"dynamic": False}, None, 128, False),
    "M128 N64 w8 s3": ({"dynamic": True}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, 128, False),
    "M128 N128 w8 s2": ({"dynamic": True}, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}, 128, False),
    "M64 N128 w4 s3": ({"dynamic": True}, {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}, 128, False),
    "M128 N64 w8 s3 TMA": ({"dynamic": True}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3,
                                               "USE_TMA": True}, 128, False),
    "product + TMA": ({"dynamic": True}, {"USE_TMA": True}, 128, False),
    "static shapes + TMA": ({"dynamic": False}, {"USE_TMA": True}, 128, False),
    "max-autotune (static)": ({"dynamic": False, "mode": "max-autotune-no-cudagraphs"}, None, 128, False),
    "GQA heads packed in rows": ({"dynamic": True}, None, 128, True),
}


def run_variant(name, positions, n_keys, q, k, v, ref, reps):
    from torch.nn.attention.flex_attention import flex_attention
    compile_kw, options, block, packed = VARIANTS[name]
    fn = torch.compile(flex_attention, **compile_kw)
    scale = D ** -0.5
    R = positions.numel()
    if packed:
        n_rep = H_Q // H_KV
        qp = q.view(1, H_KV, n_rep * R, D)          # head h = kv head h // n_rep: rows [rep][r]
        bm = flex_block_mask(positions.repeat(n_rep), n_keys, block)
        call = lambda: fn(qp, k, v, block_mask=bm, scale=scale, kernel_options=options)  # noqa: E731
        unpack = lambda o: o.view(1, H_Q, R, D)   # noqa: E731
    else:
        bm = flex_block_mask(positions, n_keys, block)
        call = lambda: fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=options)  # noqa: E731
        unpack = lambda o: o  # noqa: E731
    t0 = time.perf_counter()
    out = unpack(call())
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    err = float((out[:, :, :ref.shape[2]].float() - ref).norm() / ref.norm())
    return {"ms": events(call, reps), "first_call_s": first_s, "rel_err": err}


def product_layouts(positions, n_keys, q, k, v, ref, reps) -> list[dict]:
    """runtime.recompute_attention's flex as a recompute pass calls it, by input layout: the
    queries contiguous [1, H, R, D] (as above) or as the model hands them over (a transposed
    view of [1, R, H, D]: q_proj's output), the keys / values contiguous or views of a larger
    per-layer buffer (the fused buffer keeps room for the question). Per layer, masks built once."""
    from kvfuse.runtime.recompute_attention import ScatteredQueries

    class Module:
        num_key_value_groups, is_causal, training = H_Q // H_KV, True, False

    R = positions.numel()
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)                   # same values, [1, R, H, D] storage
    room = torch.empty(2, H_KV, n_keys + 512, D, device=k.device, dtype=k.dtype)
    room[0, :, :n_keys], room[1, :, :n_keys] = k[0], v[0]
    k_view, v_view = room[0, :, :n_keys][None], room[1, :, :n_keys][None]     # [1, H_kv, K, D], head stride K + 512
    out = []
    for name, qq, kk, vv in (("q contiguous, K/V contiguous", q, k, v),
                             ("q transposed view, K/V contiguous", q_view, k, v),
                             ("q contiguous, K/V buffer views", q, k_view, v_view),
                             ("q transposed view, K/V buffer views", q_view, k_view, v_view)):
        sq = ScatteredQueries(positions, n_keys, "flex")
        try:
            got = sq.attend(Module(), qq, kk, vv, D ** -0.5)                    # [1, R, H, D]
            torch.cuda.synchronize()
            err = float((got[:, :ref.shape[2]].transpose(1, 2).float() - ref).norm() / ref.norm())
            out.append({"variant": f"product, {name}", "ms": events(lambda: sq.attend(Module(), qq, kk, vv, D ** -0.5),
                                                                   reps), "rel_err": err})
        except Exception as exc:  # noqa: BLE001
            out.append({"variant": f"product, {name}", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="16384,32768")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--variants", default="|".join(VARIANTS), help="names separated by |")
    p.add_argument("--out", default=".")
    a = p.parse_args()
    rows = []
    for context in [int(c) for c in a.contexts.split(",")]:
        positions, n_keys, q, k, v = scattered_problem(context, a.ratio)
        ref = reference(positions, q, k, v)
        visible = float((positions + 1).sum()) * H_Q * D * 4 / 1e12      # TFLOP of the masked attention
        for name in a.variants.split("|"):
            try:
                got = run_variant(name, positions, n_keys, q, k, v, ref, a.reps)
            except Exception as exc:  # noqa: BLE001 - a variant this torch does not take
                got = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            got.update(context=context, rows=positions.numel(), variant=name)
            if "ms" in got:
                got["tflops"] = visible / (got["ms"] / 1e3)
            rows.append(got)
            print(json.dumps(got), flush=True)
        # the product's flex (ScatteredQueries) by input layout
        for got in product_layouts(positions, n_keys, q, k, v, ref, a.reps):
            got.update(context=context, rows=positions.numel())
            if "ms" in got:
                got["tflops"] = visible / (got["ms"] / 1e3)
            rows.append(got)
            print(json.dumps(got), flush=True)
        # reference: cuDNN attention over every key for every row (no mask: 2x the needed work)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        n_rep = H_Q // H_KV
        kk, vv = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    ms = events(lambda: F.scaled_dot_product_attention(q, kk, vv, scale=D ** -0.5), a.reps)
                full_work = positions.numel() * n_keys * H_Q * D * 4 / 1e12
                got = {"variant": f"{backend.name} no mask (all keys)", "ms": ms, "tflops": full_work / (ms / 1e3)}
            except Exception as exc:  # noqa: BLE001
                got = {"variant": f"{backend.name} no mask", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            got.update(context=context, rows=positions.numel())
            rows.append(got)
            print(json.dumps(got), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flex_probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                     "torch": torch.__version__, "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['context']:>6} {r['rows']:>5} {r['variant']:<34} "
              + (f"{r['ms']:7.3f} ms {r['tflops']:6.0f} TFLOP/s err {r.get('rel_err', float('nan')):.1e}"
                 if "ms" in r else r["error"]))


if __name__ == "__main__":
    main()
