"""The recompute-ratio sweep of one `kvfuse eval` folder, on the examples every cell shares:

    python3 -m kvfuse.bench.sweep RUN_DIR --methods kvfuse,prophet,cacheblend,reuse \
        --ratios 0.05,0.1,0.15,0.2,0.3 [--out bench/results/sweep-facts]

A folder filled by several invocations holds cells of different n (a headline run at
n = 100, the sweep's other ratios at n = 50); means over different examples would move
with the sample, not the ratio. This keeps the examples present in every (method, ratio)
cell, and writes OUT.md (per method and ratio: score, retention, answer KL, first-token KL,
whole-answer agreement; kvfuse's paired answer-KL gain over each other method at each
ratio with bootstrap 95% intervals) and OUT.png (score and answer KL against the ratio).
Raises SystemExit when no example has every cell.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvfuse.bench.compare_runs import FULL, load_rows
from kvfuse.bench.metrics import bootstrap_ci


def shared_examples(rows: dict, methods: list[str], ratios: list[float]) -> list[str]:
    """Examples with a row for every (method, ratio) and the full prefill."""
    cells = [(m, r) for m in methods for r in ratios] + [FULL]
    return sorted(set.intersection(*[{k[0] for k in rows if k[1:] == cell} for cell in cells]))


def sweep_table(rows: dict, methods: list[str], ratios: list[float], examples: list[str]) -> list[dict]:
    """One dict per (method, ratio): means over `examples` of score, answer KL, KL, agreement."""
    full = sum(rows[(e, *FULL)]["score"] for e in examples) / len(examples)
    out = []
    for m in methods:
        for r in ratios:
            got = [rows[(e, m, r)] for e in examples]
            mean = lambda k: sum(float(x[k]) for x in got) / len(got)  # noqa: E731
            out.append({"method": m, "ratio": r, "n": len(got), "score": mean("score"),
                        "retention": mean("score") / full if full else float("nan"),
                        "answer_kl": mean("answer_kl"), "kl": mean("kl"), "agree": mean("agree")})
    return out


def paired_gains(rows: dict, ours: str, others: list[str], ratios: list[float], examples: list[str]) -> list[dict]:
    """Answer-KL gain of `ours` over each other method (other − ours, > 0: ours is closer)."""
    out = []
    for r in ratios:
        for m in others:
            diffs = [rows[(e, m, r)]["answer_kl"] - rows[(e, ours, r)]["answer_kl"] for e in examples]
            lo, hi = bootstrap_ci(diffs)
            out.append({"ratio": r, "versus": m, "gain": sum(diffs) / len(diffs), "lo": lo, "hi": hi})
    return out


def plot(table: list[dict], full_score: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in dict.fromkeys(t["method"] for t in table):
        pts = [t for t in table if t["method"] == m]
        ax1.plot([t["ratio"] for t in pts], [t["score"] for t in pts], marker="o", label=m)
        ax2.plot([t["ratio"] for t in pts], [t["answer_kl"] for t in pts], marker="o", label=m)
    ax1.axhline(full_score, color="black", ls="--", lw=1, label="full prefill")
    ax1.set(xlabel="recompute ratio", ylabel="score", title=title)
    ax2.set(xlabel="recompute ratio", ylabel="answer KL(full‖method), nats", yscale="log", title="divergence")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--methods", default="kvfuse,prophet,cacheblend,reuse", help="the first is compared to the rest")
    ap.add_argument("--ratios", default="0.05,0.1,0.15,0.2,0.3")
    ap.add_argument("--out", default=None, help="OUT.md and OUT.png (default: RUN_DIR/sweep)")
    args = ap.parse_args(argv)
    methods, ratios = args.methods.split(","), [float(r) for r in args.ratios.split(",")]
    rows = load_rows(args.run_dir)
    examples = shared_examples(rows, methods, ratios)
    if not examples:
        raise SystemExit(f"no example of {args.run_dir} has every cell of {methods} x {ratios}: run them first")
    meta = json.loads((Path(args.run_dir) / "meta.json").read_text())
    table = sweep_table(rows, methods, ratios, examples)
    full = sum(rows[(e, *FULL)]["score"] for e in examples) / len(examples)
    out = Path(args.out) if args.out else Path(args.run_dir) / "sweep"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{meta['suite']} · {meta['model']} · n = {len(examples)}"
    plot(table, full, out.parent / f"{out.name}.png", title)   # (not with_suffix: names hold dots, "qwen2.5")
    lines = [f"# Recompute-ratio sweep: {title}", "",
             f"- command: `python3 -m kvfuse.bench.sweep {args.run_dir} --methods {args.methods} --ratios {args.ratios}`",
             f"- examples: the {len(examples)} that every (method, ratio) cell shares; full prefill score {full:.3f}",
             "", "| method | ratio | score | retention | answer KL | first-token KL | agree |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {t['method']} | {t['ratio']} | {t['score']:.3f} | {100 * t['retention']:.1f}% | {t['answer_kl']:.3f} | "
              f"{t['kl']:.3f} | {100 * t['agree']:.0f}% |" for t in table]
    lines += ["", f"Paired answer-KL gain of {methods[0]} (other − {methods[0]}; > 0: {methods[0]} is closer to the "
              "full prefill; an interval that excludes 0 is a lead or lag, one that holds it a tie):", "",
              "| ratio | versus | gain | 95% interval |", "|---|---|---|---|"]
    lines += [f"| {g['ratio']} | {g['versus']} | {g['gain']:+.4f} | [{g['lo']:+.4f}, {g['hi']:+.4f}] |"
              for g in paired_gains(rows, methods[0], methods[1:], ratios, examples)]
    (out.parent / f"{out.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
