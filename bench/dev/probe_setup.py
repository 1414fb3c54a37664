"""What the dev probes share (bench/dev/*_probe.py): their common options, the bench's config for
one Llama-3-8B context, the random-weight model on CUDA. Not a product path."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvfuse.bench import ttft


def probe_setup(ap: argparse.ArgumentParser):
    """Adds --out, --context, --ratio, --selector to `ap`, parses it and makes the out folder:
    (args, out folder, ttft.TTFTConfig, the model, chunks in the context)."""
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--selector", default="kvfuse")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ttft.TTFTConfig(shapes=("llama3-8b",), contexts=(args.context,), ratios=(args.ratio,))
    lm = ttft.build_random_model("llama3-8b", "cuda")
    return args, out, cfg, lm, args.context // cfg.chunk_tokens
