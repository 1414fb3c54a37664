"""Compare selector variants by first-token KL on a finished eval run folder (a dev split).

    python bench/selector_dev.py RUN_DIR kvfuse,prophet,my_variant --ratios 0.15,0.05 [--variants mine.py] [--n 10]

RUN_DIR is a `kvfuse eval` output folder (its store and its full-prefill
log-probs under full/ are reused; nothing is rebuilt or written). `--variants`
imports a Python file first, so the candidate selectors it adds to
`kvfuse.runtime.selectors.SELECTORS` can be named. Prints the KL of every
variant per example, then the means: the loop used to tune `kvfuse`
(docs/selectors.md). Tune on a seed other than the reported one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from kvfuse.bench.evaluate import ExampleInputs, first_token_kl
from kvfuse.bench.suites import make_suite
from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.fusion import prepare, run
from kvfuse.runtime.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("methods", help="comma-separated selector names")
    ap.add_argument("--ratios", default="0.15")
    ap.add_argument("--variants", type=Path, help="a .py file that registers extra selectors")
    ap.add_argument("--n", type=int, default=1_000_000, help="at most this many examples")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.variants:
        spec = importlib.util.spec_from_file_location("selector_variants", args.variants)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    methods, ratios = args.methods.split(","), [float(r) for r in args.ratios.split(",")]
    meta = json.loads((args.run_dir / "meta.json").read_text())
    lm = load_model(meta["model"])
    inputs = ExampleInputs(FusionEngine(args.run_dir / "store", lm, verify=False))
    kl: dict[tuple[str, float], list[float]] = {(m, r): [] for m in methods for r in ratios}
    done = 0
    n_run = len(list((args.run_dir / "full").glob("*.pt")))  # suites are prefix-stable in n
    for ex in make_suite(meta["suite"], lm.tokenizer, n_run, meta["seed"]).examples:
        full_path = args.run_dir / "full" / f"{ex.id}.pt"
        if done >= args.n or not full_path.exists():
            continue
        done += 1
        full_lp = torch.load(full_path)
        prep = prepare(lm, inputs.engine.prefix, inputs.chunks(inputs.chunk_ids(ex)), inputs.question_ids(ex))
        cells = []
        for (m, r), values in kl.items():
            values.append(first_token_kl(full_lp, run(prep, m, r).logits))
            cells.append(f"{m}@{r}={values[-1]:.3f}")
        print(ex.id, *cells, flush=True)
    print(f"mean first-token KL over {done} examples")
    for (m, r), values in kl.items():
        print(f"  {m:>16} {r:.2f}  {sum(values) / max(1, len(values)):.4f}")


if __name__ == "__main__":
    main()
