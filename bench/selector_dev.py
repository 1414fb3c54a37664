"""Compare selector variants by first-token KL on a finished eval run folder (a dev split).

    python bench/selector_dev.py RUN_DIR kvfuse,prophet,my_variant --ratios 0.15,0.05 [--variants mine.py] [--n 10] [--answers]

RUN_DIR is a `kvfuse eval` output folder (its store and its full-prefill
log-probs under full/ are reused; nothing is rebuilt or written). `--variants`
imports a Python file first, so the candidate selectors it adds to
`kvfuse.runtime.selectors.SELECTORS` can be named. Prints the KL of every
variant per example, then the means: the loop used to tune `kvfuse`
(docs/selectors.md). Tune on a seed other than the reported one.

`--answers` also scores the whole answer, as `kvfuse eval` does: the answer KL
teacher-forced along the full prefill's greedy answer (read from the run's
results.jsonl) and whether the variant's own greedy answer is the same. The
first token alone misses most entity errors (issue 12), so tune on this.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from kvfuse.bench.compare_runs import full_answers
from kvfuse.bench.evaluate import ExampleInputs, _stop_ids, first_token_kl
from kvfuse.bench.metrics import answer_kls
from kvfuse.bench.suites import make_suite
from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.fusion import full_prefill, greedy_batch, prepare, run
from kvfuse.runtime.model import load_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("methods", help="comma-separated selector names")
    ap.add_argument("--ratios", default="0.15")
    ap.add_argument("--variants", type=Path, help="a .py file that registers extra selectors")
    ap.add_argument("--n", type=int, default=1_000_000, help="at most this many examples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--answers", action="store_true", help="also the answer KL and whole-answer agreement")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variants:
        spec = importlib.util.spec_from_file_location("selector_variants", args.variants)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    methods, ratios = args.methods.split(","), [float(r) for r in args.ratios.split(",")]
    meta = json.loads((args.run_dir / "meta.json").read_text())
    lm = load_model(meta["model"])
    inputs = ExampleInputs(FusionEngine(args.run_dir / "store", lm, verify=False))
    cells_of = [(m, r) for m in methods for r in ratios]
    kl: dict[tuple[str, float], list[float]] = {c: [] for c in cells_of}
    akl: dict[tuple[str, float], list[float]] = {c: [] for c in cells_of}
    agree: dict[tuple[str, float], list[float]] = {c: [] for c in cells_of}
    answers_of = full_answers(args.run_dir) if args.answers else {}
    done = 0
    n_run = len(list((args.run_dir / "full").glob("*.pt")))  # suites are prefix-stable in n
    suite = make_suite(meta["suite"], lm.tokenizer, n_run, meta["seed"])
    stop = _stop_ids(lm, suite)
    for ex in suite.examples:
        full_path = args.run_dir / "full" / f"{ex.id}.pt"
        if done >= args.n or not full_path.exists() or (args.answers and ex.id not in answers_of):
            continue
        done += 1
        full_lp = torch.load(full_path)
        chunks, q_ids = inputs.chunks(inputs.chunk_ids(ex)), inputs.question_ids(ex)
        prep = prepare(lm, inputs.engine.prefix, chunks, q_ids)
        results = [run(prep, m, r) for m, r in cells_of]
        cells = []
        for c, res in zip(cells_of, results):
            kl[c].append(first_token_kl(full_lp, res.logits))
            cells.append(f"{c[0]}@{c[1]}={kl[c][-1]:.3f}")
        if args.answers:
            ids = answers_of[ex.id]
            all_ids = torch.cat([inputs.engine.prefix.tokens, *[ch.tokens for ch in chunks], q_ids.int()])
            n = len(all_ids)
            pending = [full_prefill(lm, all_ids)] + [(res.cache, res.logits) for res in results]
            kls = answer_kls(lm, pending, n, ids)[1:]
            own = greedy_batch(lm, [res.cache for res in results], [res.logits for res in results], n,
                               ex.max_new_tokens, stop)
            for i, c in enumerate(cells_of):
                akl[c].append(float(kls[i].mean()))
                agree[c].append(float(own[i] == ids))
                cells[i] += f"/{akl[c][-1]:.3f}{'' if agree[c][-1] else '*'}"
        print(ex.id, *cells, flush=True)
    print(f"means over {done} examples: first-token KL" + (" / answer KL / agreement" if args.answers else ""))
    for c in cells_of:
        line = f"  {c[0]:>20} {c[1]:.2f}  {_mean(kl[c]):.4f}"
        print(line + (f"  {_mean(akl[c]):.4f}  {_mean(agree[c]):.2f}" if args.answers else ""))


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


if __name__ == "__main__":
    main()
