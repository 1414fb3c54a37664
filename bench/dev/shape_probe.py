"""Dev tool (issue 11): do warm requests pay for shapes they have not seen before?

    python3 bench/dev/shape_probe.py --out DIR [--context 16384]

The bench replays one request (same question, same selection), so every shape-keyed cache
(cuDNN attention plans, compiled kernels, the allocator) is warm after the first run. Here:
warm runs of the same request, then of a new random question each (a new selection), then of
other context lengths; and cuDNN attention's first call per new key length against its second.
Writes shape_probe.json under --out. Not a product path.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from kvfuse.bench import ttft
from kvfuse.bench.timing import median
from probe_setup import probe_setup


def cudnn_first_calls(keys=(4096, 4224, 8192, 8320, 12288, 12416), rows=512) -> list[dict]:
    out = []
    q = torch.randn(1, 32, rows, 128, device="cuda", dtype=torch.bfloat16)
    for p in keys:
        k = torch.randn(1, 8, p, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=0.088)
            torch.cuda.synchronize()
            times.append(round((time.perf_counter() - t0) * 1e3, 3))
        out.append({"keys": p, "rows": rows, "ms": times})
        print("cudnn", p, times, flush=True)
    return out


def decode_first_calls(lengths=(16416, 16417, 16418, 20000)) -> list[dict]:
    """One decode step's attention as transformers runs it (one query, no mask, grouped heads):
    does a new key length cost a new plan?"""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = []
    for n in lengths:
        k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sdpa_attention_forward(module, q, k, k, None, scaling=0.088)
            torch.cuda.synchronize()
            times.append(round((time.perf_counter() - t0) * 1e3, 3))
        out.append({"keys": n, "ms": times})
        print("decode", n, times, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-dtype", default="model")
    ap.add_argument("--alternate", type=int, default=0,
                    help="only: N pairs of warm runs of one request alternating KVFUSE_SHAPE_BUCKETS=0 / 1 (ABBA)")
    args, out, cfg, lm, n = probe_setup(ap)
    store, prefix, ids = ttft.ensure_store(ttft.store_dir(cfg, "llama3-8b", args.kv_dtype), lm, n + 4, cfg.chunk_tokens, cfg.prefix_tokens, "cuda",
                                           args.kv_dtype)
    engine = ttft.make_engine(store, lm, cfg)
    gen = torch.Generator().manual_seed(1)
    vocab = lm.model.config.vocab_size
    question = torch.randint(0, vocab, (cfg.question_tokens,), generator=gen)
    runner = ttft.Runner(engine, question, args.selector)
    request = [prefix, *ids[:n]]
    keep = ("ttft_ms", "select_s", "recompute_s", "cuda_mallocs")

    def run(req, q=None, state="warm"):
        if q is not None:
            runner.question = q
        r = runner.fused(req, args.ratio, state)
        return {k: (round(r[k] * 1e3, 1) if k.endswith("_s") else r.get(k)) for k in keep}

    result = {"context": args.context, "selector": args.selector, "kv_dtype": args.kv_dtype,
              "shape_buckets": os.environ.get("KVFUSE_SHAPE_BUCKETS", "1")}
    if args.alternate:
        runs = {"0": [], "1": []}
        for setting in ("0", "1"):
            os.environ["KVFUSE_SHAPE_BUCKETS"] = setting
            run(request), run(request)
        for i in range(args.alternate):
            for setting in (("0", "1") if i % 2 == 0 else ("1", "0")):
                os.environ["KVFUSE_SHAPE_BUCKETS"] = setting
                runs[setting].append(run(request)["ttft_ms"])
        diff = [b - a for a, b in zip(runs["0"], runs["1"])]
        result["alternate"] = {"off_ms": runs["0"], "on_ms": runs["1"], "on_minus_off_mean": sum(diff) / len(diff),
                               "median_off": median(runs["0"]), "median_on": median(runs["1"])}
        print("alternate", json.dumps(result["alternate"]), flush=True)
        (out / "shape_probe_alternate.json").write_text(json.dumps(result, indent=1))
        engine.close()
        return
    run(request)
    result["same"] = [run(request) for _ in range(5)]
    result["new_question"] = [run(request, torch.randint(0, vocab, (cfg.question_tokens,), generator=gen))
                              for _ in range(8)]
    result["same_again"] = [run(request, question) for _ in range(3)]
    result["new_question_lengths"] = [run(request, torch.randint(0, vocab, (cfg.question_tokens + d,), generator=gen))
                                      for d in (1, 3, 7, -2)]
    result["other_contexts"] = [run([prefix, *ids[i:i + n - d]], question) for i, d in ((1, 1), (2, 2), (3, 3), (4, 0))]
    result["other_contexts_again"] = [run([prefix, *ids[i:i + n - d]], question) for i, d in ((1, 1), (2, 2), (3, 3))]
    for key in ("same", "new_question", "same_again", "new_question_lengths", "other_contexts", "other_contexts_again"):
        print(key, [r["ttft_ms"] and round(r["ttft_ms"], 1) for r in result[key]],
              "select", [r["select_s"] for r in result[key]], "mallocs", [r["cuda_mallocs"] for r in result[key]],
              flush=True)
    result["cudnn"] = cudnn_first_calls()
    result["decode"] = decode_first_calls()
    engine.close()
    (out / "shape_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
