"""Oracle recompute sets on the facts suite: how low can the answer KL go when the answer is known?

    python -m kvfuse.bench.oracle_selection RUN_DIR [--n 24] [--ratio 0.15] [--threads 1]

RUN_DIR is a finished `kvfuse eval --suite facts` folder (its store and the full
prefill's answers in results.jsonl are reused). For each example, the answer KL
(teacher-forced along the full prefill's greedy answer, as `kvfuse eval`
reports it) of: reuse; the default selector; the default's picks plus the
answer's own tokens in the gold document; a window of the budget's size centred
on the answer there; the whole gold document; every document but the gold one.
A bound on what any selector could reach by ranking tokens better (docs/selectors.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.fusion import full_prefill, prepare, run
from kvfuse.runtime.model import load_model

from .compare_runs import full_answers
from .evaluate import ExampleInputs
from .metrics import answer_kls
from .suites import make_suite

SETS = ("reuse", "default", "default+answer", "answer-window", "gold-doc", "other-docs")


def answer_positions(tokenizer, chunk_tokens: torch.Tensor, text: str, start: int) -> list[int]:
    """Absolute positions of the tokens of `chunk_tokens` (a chunk at `start`) that spell `text`."""
    ids = chunk_tokens.tolist()
    at = tokenizer.decode(ids).find(text)
    if at < 0:
        return []
    out, before = [], 0
    for j in range(len(ids)):
        end = len(tokenizer.decode(ids[:j + 1]))
        if end > at and before < at + len(text):
            out.append(start + j)
        before = end
    return out


def oracle_sets(tokenizer, prep, chunks, answer: str, picks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The recompute sets of SETS (absolute positions) for one prepared prompt; the gold chunk is
    the one whose text holds `answer`. Raises ValueError when none does."""
    lay = prep.layout
    gold = [k for k, c in enumerate(chunks) if answer in tokenizer.decode(c.tokens.tolist())]
    if not gold:
        raise ValueError(f"no chunk holds the answer {answer!r}")
    g = gold[0]
    gs, gn = lay.chunk_starts[g], lay.chunk_lens[g]
    span = torch.tensor(answer_positions(tokenizer, chunks[g].tokens, answer, gs), dtype=torch.long)
    mid = int(span.float().mean()) if len(span) else gs + gn // 2
    b = picks.numel()
    a = max(gs, min(mid - b // 2, gs + gn - b))
    others = [torch.arange(s, s + n) for k, (s, n) in enumerate(zip(lay.chunk_starts, lay.chunk_lens)) if k != g]
    return {"default+answer": torch.cat((picks, span)).unique(), "answer-window": torch.arange(a, min(a + b, gs + gn)),
            "gold-doc": torch.arange(gs, gs + gn), "other-docs": torch.cat(others)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = json.loads((args.run_dir / "meta.json").read_text())
    if meta["suite"] != "facts":
        raise SystemExit(f"{args.run_dir} is a {meta['suite']} run; the oracle needs a facts run (one gold document)")
    full = full_answers(args.run_dir)
    lm = load_model(meta["model"])
    tok = lm.tokenizer
    inputs = ExampleInputs(FusionEngine(args.run_dir / "store", lm, verify=False))
    means: dict[str, list[float]] = {k: [] for k in SETS}
    for ex in make_suite("facts", tok, len(full), meta["seed"]).examples:
        if len(means["reuse"]) >= args.n or ex.id not in full:
            continue
        chunks, q_ids = inputs.chunks(inputs.chunk_ids(ex)), inputs.question_ids(ex)
        prep = prepare(lm, inputs.engine.prefix, chunks, q_ids)
        default = run(prep, "kvfuse", args.ratio)
        runs = {"reuse": run(prep, "reuse", 0.0), "default": default}
        for name, sel in oracle_sets(tok, prep, chunks, ex.answers[0], default.recomputed).items():
            runs[name] = run(prep, "reuse", 0.0, selected=sel)
        all_ids = torch.cat([inputs.engine.prefix.tokens, *[c.tokens for c in chunks], q_ids.int()])
        kls = answer_kls(lm, [full_prefill(lm, all_ids)] + [(r.cache, r.logits) for r in runs.values()],
                         len(all_ids), full[ex.id])[1:]
        for name, kl in zip(runs, kls):
            means[name].append(float(kl.mean()))
        print(ex.id, *(f"{k}={means[k][-1]:.3f}" for k in SETS), flush=True)
    print(f"mean answer KL over {len(means['reuse'])} examples (ratio {args.ratio})")
    for k in SETS:
        print(f"  {k:>16} {sum(means[k]) / max(1, len(means[k])):.4f}")


if __name__ == "__main__":
    main()
