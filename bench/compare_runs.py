"""Paired comparison of `kvfuse eval` folders of one suite and seed (e.g. an enriched, an
isolated and an other-neighbour-rule build) on the examples they share:

    python3 -m kvfuse.bench.compare_runs RUN_A RUN_B [RUN_C ...] [--methods reuse,kvfuse] [--ratio 0.15]

For each method: mean score, answer KL, first-token KL and whole-answer agreement per folder,
then each folder minus the first on answer KL and score, with paired bootstrap 95% intervals
(`bench.metrics.bootstrap_ci`). The full prefill is the same in every folder (same prompts).
Raises SystemExit naming a folder without results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvfuse.bench.metrics import bootstrap_ci

FULL = ("full-prefill", 1.0)


def load_rows(folder: str) -> dict[tuple[str, str, float], dict]:
    """(example, method, ratio) -> the row of FOLDER/results.jsonl (the last one written wins)."""
    path = Path(folder) / "results.jsonl"
    if not path.exists():
        raise SystemExit(f"{folder} holds no results.jsonl: give `kvfuse eval --out` folders")
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows[(r["example"], r["method"], r["ratio"])] = r
    return rows


def full_answers(folder) -> dict[str, list[int]]:
    """example id -> the full prefill's greedy answer ids in FOLDER/results.jsonl."""
    return {ex: r["answer_ids"] for (ex, m, ratio), r in load_rows(folder).items()
            if (m, ratio) == FULL and "answer_ids" in r}


def compare(folders: list[str], methods: list[str], ratio: float) -> list[str]:
    data = {f: load_rows(f) for f in folders}
    lines = []
    for method in methods:
        key = (method, ratio)
        examples = sorted(set.intersection(*[{k[0] for k in rows if k[1:] == key} for rows in data.values()]))
        if not examples:
            continue
        lines.append(f"{method} @ {ratio}: {len(examples)} shared examples")
        for f, rows in data.items():
            got = [rows[(e, *key)] for e in examples]
            full = sum(rows[(e, *FULL)]["score"] for e in examples) / len(examples)
            mean = lambda k: sum(float(r[k]) for r in got) / len(got)  # noqa: E731
            lines.append(f"  {f}: score {mean('score'):.3f} (full prefill {full:.3f}), answer KL "
                         f"{mean('answer_kl'):.3f}, first-token KL {mean('kl'):.3f}, agree {mean('agree'):.2f}")
        base = folders[0]
        for f in folders[1:]:
            for metric in ("answer_kl", "score"):
                diffs = [data[f][(e, *key)][metric] - data[base][(e, *key)][metric] for e in examples]
                lo, hi = bootstrap_ci(diffs)
                lines.append(f"    {f} - {base}: {metric} {sum(diffs) / len(diffs):+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--methods", default="reuse,kvfuse,prophet")
    ap.add_argument("--ratio", type=float, default=0.15)
    args = ap.parse_args(argv)
    print("\n".join(compare(args.folders, args.methods.split(","), args.ratio)))


if __name__ == "__main__":
    main()
