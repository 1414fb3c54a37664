"""`kvfuse eval`: accuracy of every selector against a full prefill on a suite (docs/eval.md)."""

from __future__ import annotations

import click


def _floats(ctx, param, value: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 0.05,0.1, got {value!r}") from None


def _names(ctx, param, value: str) -> list[str]:
    from kvfuse.runtime.selectors import SELECTORS
    names = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [x for x in names if x not in SELECTORS]
    if unknown or not names:
        raise click.BadParameter(f"unknown method(s) {unknown}; choose from {', '.join(SELECTORS)}")
    return names


def _kv_dtypes(ctx, param, value: str) -> str:
    names = [x.strip() for x in value.split(",") if x.strip()]
    if not names or any(x not in ("model", "fp8", "int8") for x in names):
        raise click.BadParameter(f"expected model, fp8, int8 or a list like fp8,int8; got {value!r}")
    return ",".join(names)


@click.command("eval")
@click.option("--suite", type=click.Choice(["niah", "squad", "facts", "xchunk"]), default=None,
              help="Required unless --report-only. facts: invented facts among similar documents; "
                   "xchunk: variable tracking and two-hop key chains across chunks (docs/eval.md).")
@click.option("--model", default="qwen2.5-0.5b", show_default=True)
@click.option("--methods", default="reuse,epic,cacheblend,a3,prophet,kvfuse", show_default=True, callback=_names)
@click.option("--ratios", default="0.15", show_default=True, callback=_floats)
@click.option("--n", default=50, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (store, results.jsonl, report).")
@click.option("--no-enrich", is_flag=True, help="Build isolated chunks (no FusionRAG neighbours).")
@click.option("--corpus-examples", default=50, show_default=True, type=click.IntRange(1),
              help="The store holds the documents of max(n, this many) examples, so runs with different --n "
                   "share one store (enrichment neighbours depend on the corpus).")
@click.option("--kv-dtype", default="model", show_default=True, callback=_kv_dtypes,
              help="fp8, int8 or fp8,int8: also store the suite's chunks so (re-encoded from the model-dtype store) and run every "
                   "method on them too, as `<method>@fp8` rows paired with the model-dtype ones (the accuracy cost).")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads (default: torch's choice).")
@click.option("--report-only", is_flag=True, help="Only rewrite the report of --out from its results.")
def eval_cmd(suite, model, methods, ratios, n, seed, out, no_enrich, corpus_examples, threads, report_only,
             kv_dtype="model"):
    """Build the SUITE's store, run a full prefill and every method at every ratio on the same
    token ids, and write accuracy-<suite>-<model>-<store>.{json,md,png} into --out. Rerunning with the
    same --out resumes: finished (example, method, ratio) results are kept."""
    import torch

    from kvfuse.bench.evaluate import EvalConfig, evaluate, markdown, rewrite_report
    if report_only:
        for path in rewrite_report(out):
            click.echo(path)
        return
    if suite is None:
        raise click.UsageError("--suite is required (niah, squad, facts or xchunk)")
    if threads:
        torch.set_num_threads(threads)
    cfg = EvalConfig(suite=suite, model=model, methods=methods, ratios=ratios, n=n, seed=seed, out=out,
                     build={"enrich": False} if no_enrich else {}, corpus_examples=corpus_examples, kv_dtype=kv_dtype)
    click.echo(markdown(evaluate(cfg)))
