"""Reconstruction error of quantised chunk KV by scale grouping, on a real model's KV.

    python3 -m kvfuse.bench.kv_quant_error --model qwen2.5-0.5b --chunks 12 --out bench/results/kv_quant_error.json

Prefills `chunks` SQuAD paragraphs (isolated, after the shared prefix, as the build does)
and, for fp8 e4m3 and int8, quantises keys and values with a scale per channel (over the
chunk's tokens) or per token (over the head's channels), per (layer, KV head). Reports the
relative error ||x - x̂|| / ||x|| over all layers, and the error of one layer's attention
output with the chunk's own last-token query (keys and values quantised as chosen). Used to
choose `loader/quant.py`'s grouping (keys per channel, values per token).
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone

import torch

QMAX = {"fp8": 448.0, "int8": 127.0}


def quantise(x: torch.Tensor, dtype: str, group: str) -> torch.Tensor:
    """x [L, H, T, D] -> dequantised x̂ with one scale per (L, H, channel) or (L, H, token);
    "channel-centred": per channel, about each channel's midrange over the tokens."""
    x = x.float()
    if group == "channel-centred":
        offset = ((x.amax(dim=2, keepdim=True) + x.amin(dim=2, keepdim=True)) / 2).to(torch.bfloat16).float()
        return quantise(x - offset, dtype, "channel") + offset
    dim = 2 if group == "channel" else 3
    scale = x.abs().amax(dim=dim, keepdim=True) / QMAX[dtype]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (x / scale).clamp(-QMAX[dtype], QMAX[dtype])
    y = y.to(torch.float8_e4m3fn).float() if dtype == "fp8" else y.round()
    return y * scale


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def rel_varying(a: torch.Tensor, b: torch.Tensor) -> float:
    """The error of what varies across tokens (dim 2), relative to that variation: softmax
    ignores an error shared by every token of a channel, not one that differs between them."""
    err, x = a.float() - b.float(), b.float()
    return float((err - err.mean(dim=2, keepdim=True)).norm() / (x - x.mean(dim=2, keepdim=True)).norm())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from kvfuse.bench.suites import squad_suite
    from kvfuse.pipeline.build import BuildContext
    from kvfuse.pipeline.precompute import prefill_chunk, prefill_prefix
    from kvfuse.runtime.model import load_model

    lm = load_model(args.model)
    ctx = BuildContext.of(lm)
    prefix_kv = prefill_prefix(lm, ctx.prefix_ids)
    docs = squad_suite(args.chunks, 0).documents[: args.chunks]
    kvs = []
    for d in docs:
        ids = lm.tokenizer(d.text, add_special_tokens=False)["input_ids"][:512]
        kv, _ = prefill_chunk(lm, prefix_kv, ids)
        kvs.append(kv)  # [L, 2, H, T, D]
    rows = []
    for dtype in ("fp8", "int8"):
        for part, name in ((0, "keys"), (1, "values")):
            for group in ("channel", "token", "channel-centred"):
                errs = [rel(quantise(kv[:, part], dtype, group), kv[:, part]) for kv in kvs]
                varying = [rel_varying(quantise(kv[:, part], dtype, group), kv[:, part]) for kv in kvs]
                rows.append({"dtype": dtype, "part": name, "group": group, "rel_error": sum(errs) / len(errs),
                             "rel_error_varying": sum(varying) / len(varying)})
    result = {"command": "python3 -m kvfuse.bench.kv_quant_error " + " ".join(argv or []),
              "model": args.model, "chunks": len(kvs), "tokens": sum(kv.shape[3] for kv in kvs),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "reconstruction": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
