"""Token-by-token comparison of fused prefills with the full prefill on a few questions (issue 12).

    python -m kvfuse.bench.diagnose_fusion CACHE_DIR "Who built the Orrin Bridge?" ... \
        [--methods reuse,epic,cacheblend,a3,qattn,prophet,kvfuse] [--ratio 0.15] [--top-k 4] [--verbose]

For every question: the full prefill's greedy answer, then per method (each selector at
`--ratio`, plus `kvfuse@1.0` and `reuse`) its own greedy answer and the teacher-forced
KL(full || method) at every position of the full prefill's answer. Ratio 1.0 must
reproduce the full prefill (same tokens, KL ~ 0); if it doesn't, the mechanism is wrong,
not the selection. `--verbose` prints the per-position KL with the answer token.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.fusion import full_prefill, greedy, greedy_batch, prepare, run
from kvfuse.runtime.model import load_model

from .metrics import answer_kls, kl_per_position

METHODS = ("reuse", "epic", "cacheblend", "a3", "qattn", "prophet", "kvfuse")


def diagnose(engine: FusionEngine, question: str, methods: list[tuple[str, float]], top_k: int = 4,
             max_new_tokens: int = 32, chunk_ids: list[str] | None = None) -> dict:
    """{"chunks", "full": answer text, "rows": [{"method", "ratio", "answer", "same", "kl": [T] list}]}
    chunk_ids: the prompt's chunks (default: the engine's retrieval of `top_k`)."""
    lm = engine.lm
    chunk_ids = chunk_ids or engine.retrieve(question, top_k)
    chunks = [engine.store.read(c) for c in chunk_ids]
    q_ids = engine.question_ids(question)
    all_ids = torch.cat([engine.prefix.tokens, *[c.tokens for c in chunks], q_ids.int()])
    n = len(all_ids)
    cache, logits = full_prefill(lm, all_ids)
    full_ids = greedy(lm, cache, logits, n, max_new_tokens)
    cache, logits = full_prefill(lm, all_ids)  # greedy extended the first cache
    prep = prepare(lm, engine.prefix, chunks, q_ids)
    results = [run(prep, method, ratio) for method, ratio in methods]
    pending = [(cache, logits)] + [(r.cache, r.logits) for r in results]
    kls = answer_kls(lm, pending, n, full_ids)                                       # full prefill first
    own = greedy_batch(lm, [c for c, _ in pending[1:]], [l for _, l in pending[1:]], n, max_new_tokens)
    rows = [{"method": m, "ratio": r, "answer": _text(lm, o), "same": o == full_ids, "kl": kl.tolist(),
             "n_recomputed": res.n_recomputed}
            for (m, r), res, o, kl in zip(methods, results, own, kls[1:])]
    docs = [r.doc_id for c in chunk_ids for r in engine.records if r.chunk_id == c]
    return {"question": question, "docs": docs, "full": _text(lm, full_ids),
            "full_tokens": [lm.tokenizer.decode([t]) for t in full_ids], "rows": rows}


def prefix_caching_check(engine: FusionEngine, question: str, top_k: int = 4) -> dict:
    """Ratio 0 with one chunk (the first retrieved) must be prefix caching: on an isolated store
    (chunk stored at its own position, pos_base == prefix length) the first-token logits equal a
    full prefill of [prefix][chunk][question]. Returns {"chunk", "pos_base", "moved", "kl", "same"}."""
    lm = engine.lm
    cid = engine.retrieve(question, top_k)[0]
    chunk = engine.store.read(cid)
    q_ids = engine.question_ids(question)
    all_ids = torch.cat([engine.prefix.tokens, chunk.tokens, q_ids.int()])
    cache, logits = full_prefill(lm, all_ids)
    full_ids = greedy(lm, cache, logits, len(all_ids))
    res = run(prepare(lm, engine.prefix, [chunk], q_ids), "reuse", 0.0)
    lp, full_lp = res.logits.log_softmax(-1), logits.log_softmax(-1)
    own = greedy(lm, res.cache, res.logits, len(all_ids))
    return {"chunk": cid, "pos_base": chunk.pos_base, "moved": engine.prefix.kv.shape[3] - chunk.pos_base,
            "kl": float(kl_per_position(full_lp, lp)), "same": own == full_ids}


def _text(lm, ids) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=True).strip()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache")
    ap.add_argument("questions", nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--more-ratios", default="1.0", help="kvfuse also runs at these ratios (1.0 checks the mechanism)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--json", default=None, help="Also write every result (whole answers, per-position KL) here.")
    args = ap.parse_args(argv)
    engine = FusionEngine(args.cache, load_model(args.model))
    methods = [(m, 0.0 if m == "reuse" else args.ratio) for m in args.methods.split(",")] + \
        [("kvfuse", float(r)) for r in args.more_ratios.split(",")]
    dumps = []
    for q in args.questions:
        d = diagnose(engine, q, methods, args.top_k)
        d["prefix_caching"] = prefix_caching_check(engine, q, args.top_k)
        dumps.append(d)
        print(f"\n## {q}\nretrieved: {', '.join(d['docs'])}\nfull: {d['full']!r}")
        print(f"{'method':>16} | mean KL | max KL | same | answer")
        for r in d["rows"]:
            kl = r["kl"]
            print(f"{r['method'] + '@' + str(r['ratio']):>16} | {sum(kl) / len(kl):7.3f} | {max(kl):6.2f} | "
                  f"{'yes' if r['same'] else 'no ':>4} | {r['answer'][:140]!r}", flush=True)
            if args.verbose:
                print("    " + " ".join(f"{t!r}:{k:.2f}" for t, k in zip(d["full_tokens"], kl)))
        pc = d["prefix_caching"]
        print(f"ratio 0, first chunk alone (moved by {pc['moved']} positions): first-token KL vs "
              f"[prefix][chunk][question] prefill {pc['kl']:.2e}, same answer: {pc['same']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dumps, f, indent=1)


if __name__ == "__main__":
    main()
