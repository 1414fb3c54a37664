"""Full-prefill accuracy of a suite, without building a store: is the task sized so the model can do it?

    python -m kvfuse.bench.full_accuracy --suite xchunk --model qwen2.5-0.5b --n 10 [--threads 1]

The prompt is token for token what `kvfuse eval` feeds the full prefill
([prefix][chunks of the example's documents][question + answer prefix]); only the
full prefill runs, so it is a cheap check before a long `kvfuse eval` (the
issue asks for full-prefill accuracy >= 0.8 on a suite that measures retention).
Prints each answer with its score and the mean.
"""

from __future__ import annotations

import argparse

import torch

from kvfuse.pipeline.build import BuildContext, chunk_docs
from kvfuse.runtime.fusion import full_prefill, greedy
from kvfuse.runtime.model import load_model

from .evaluate import _stop_ids, score
from .suites import SUITES, make_suite


def full_accuracy(lm, suite_name: str, n: int, seed: int = 0, verbose: bool = True) -> float:
    """Mean score of the full prefill's greedy answers on the first n examples."""
    suite = make_suite(suite_name, lm.tokenizer, n, seed)
    ctx = BuildContext.of(lm)
    docs = {d.doc_id: d for d in suite.documents}
    tokens_of: dict[str, list[int]] = {}
    stop = _stop_ids(lm, suite)
    scores = []
    for ex in suite.examples[:n]:
        ids = list(ctx.prefix_ids)
        for d in ex.doc_ids:
            if d not in tokens_of:
                tokens_of[d] = [t for c in chunk_docs(lm, [docs[d]], suite.chunk_tokens) for t in c.token_ids]
            ids += tokens_of[d]
        text = ctx.parts["question_template"].format(question=ex.question) + ctx.parts["suffix"]
        ids += lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # as ExampleInputs.question_ids
        if ex.answer_prefix:
            ids += lm.tokenizer(ex.answer_prefix, add_special_tokens=False)["input_ids"]
        cache, logits = full_prefill(lm, torch.tensor(ids))
        answer = lm.tokenizer.decode(greedy(lm, cache, logits, len(ids), ex.max_new_tokens, stop),
                                     skip_special_tokens=True).strip()
        scores.append(score(suite, ex, answer)["score"])
        if verbose:
            print(f"{ex.id} [{ex.kind}] {len(ids)} tokens  score {scores[-1]:.2f}  expected {ex.answers}  "
                  f"answer {answer[:220]!r}", flush=True)
    return sum(scores) / len(scores)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=SUITES, required=True)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mean = full_accuracy(load_model(args.model), args.suite, args.n, args.seed)
    print(f"full-prefill score on {args.suite} ({args.model}, n = {args.n}, seed {args.seed}): {mean:.3f}")


if __name__ == "__main__":
    main()
