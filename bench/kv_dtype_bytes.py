"""KV bytes of a quantised store against the model-dtype store of the same chunks (issue 14).

    python3 -m kvfuse.bench.kv_dtype_bytes --store EVAL_OUT/store --shapes qwen2.5-0.5b,llama3-8b --out bench/results/kv_dtype_bytes.json

`--store`: a cache holding releases of the same corpus in several KV dtypes (what
`kvfuse eval --kv-dtype fp8` leaves in its --out/store): per release, the stored KV bytes
(codes and scales, `Store.kv_bytes`), the bytes per stored token and the shard files' bytes
on disk (KV + token ids + saliency + headers). `--shapes`: synthetic stores (random KV, no
model runs: the byte counts do not depend on the values) of `--chunks` chunks of 512 tokens
in a model's shape, written in bf16 and in fp8, for the bf16 ratio a CPU run can't build
(the CPU model runs in float32). Shapes: those of bench/shapes.py, or `qwen2.5-0.5b`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from kvfuse.loader import format as fmt
from kvfuse.loader.manifest import list_releases
from kvfuse.loader.store import Store

QWEN_05B = dict(n_layers=24, n_kv_heads=2, head_dim=64)  # Qwen2.5-0.5B's KV geometry


def release_bytes(cache: Path) -> list[dict]:
    """The newest release of each KV dtype in the cache: its KV bytes and shard bytes."""
    out = {}
    for release in list_releases(cache):
        with Store.open(cache, release, lease=False) as store:
            st = store.stats()
            shards = {r.shard for r in store.records(include_prefix=True)}
            disk = sum((cache / fmt.SHARDS_DIR / f"{s}{fmt.SHARD_SUFFIX}").stat().st_size for s in shards)
            stored = sum(store.record(c).n_tokens for c in {r.chunk_id for r in store.records(include_prefix=True)})
            out[st["kv_dtype"]] = {"release": release, "kv_dtype": st["kv_dtype"], "model_dtype": st["dtype"],
                                   "distinct_chunks": st["distinct_chunks"], "stored_tokens": stored,
                                   "kv_bytes": st["kv_bytes"], "kv_bytes_per_token": st["kv_bytes_per_token"],
                                   "shard_bytes": disk}
    return list(out.values())


def synthetic_bytes(shape: str, chunks: int, chunk_tokens: int = 512) -> list[dict]:
    from kvfuse.bench.synthetic import write_synthetic_store
    from kvfuse.runtime.model import ModelSpec
    if shape == "qwen2.5-0.5b":
        from transformers import AutoConfig
        config = AutoConfig.for_model("qwen2", hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                                      num_hidden_layers=24, intermediate_size=4864, vocab_size=151936)
    else:
        from kvfuse.bench.shapes import shape_config
        config = shape_config(shape)
    rows = []
    for dtype, kv in ((torch.bfloat16, "model"), (torch.bfloat16, "fp8"), (torch.float32, "model"), (torch.float32, "fp8")):
        spec = dataclasses.replace(ModelSpec.from_config(shape, config, dtype, fingerprint=f"bytes-{shape}"))
        root = Path(tempfile.mkdtemp(prefix="kvbytes-"))
        try:
            write_synthetic_store(root, spec, chunks, chunk_tokens, prefix_tokens=32, kv_dtype=kv)
            (row,) = release_bytes(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows.append({"shape": shape, **row})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """fp8/int8 release against the model-dtype release of the same model dtype and tokens."""
    out = []
    for q in rows:
        if q["kv_dtype"] == "model":
            continue
        for m in rows:
            if m["kv_dtype"] == "model" and m["model_dtype"] == q["model_dtype"] and m.get("shape") == q.get("shape") \
                    and m["stored_tokens"] == q["stored_tokens"]:
                out.append({"shape": q.get("shape", "store"), "kv_dtype": q["kv_dtype"], "against": m["model_dtype"],
                            "kv_bytes_ratio": q["kv_bytes"] / m["kv_bytes"],
                            "shard_bytes_ratio": q["shard_bytes"] / m["shard_bytes"]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None)
    ap.add_argument("--shapes", default="qwen2.5-0.5b,llama3-8b")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    store_rows = release_bytes(Path(args.store)) if args.store else []
    synth = [r for s in args.shapes.split(",") if s for r in synthetic_bytes(s, args.chunks)]
    result = {"command": "python3 -m kvfuse.bench.kv_dtype_bytes " + " ".join(argv or []),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "store": store_rows, "store_ratios": ratios(store_rows),
              "synthetic": synth, "synthetic_ratios": ratios(synth)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
