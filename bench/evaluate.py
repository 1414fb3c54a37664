"""`kvfuse eval`: every selector at every ratio against a full prefill, on one suite (docs/eval.md).

    cfg = EvalConfig(suite="niah", model="qwen2.5-0.5b", methods=["reuse", "kvfuse"], ratios=[0.15], n=50, seed=0, out=Path("runs/niah"))
    report = evaluate(cfg)          # also writes accuracy-<suite>-<model>.{json,md,png} into cfg.out

The suite's store is built with `build_cache` (the normal build path) into
`out/store`. Per example, the full prefill runs once (its first-token log-probs
kept under `out/full/`), the prompt is assembled once, and every method x ratio
runs on the same token ids. Every finished (example, method, ratio) is appended
to `out/results.jsonl` and skipped on a rerun, so an interrupted run resumes.

Per method row: the first-token KL(full || method), the answer KL (mean per-token
KL teacher-forced along the full prefill's greedy answer, its first `ANSWER_KL_TOKENS`
tokens), whether the whole greedy answer is the full prefill's, and the task score.
The report pairs `kvfuse` with every other method with bootstrap 95% intervals.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from kvfuse.runtime.engine import FusionEngine
from kvfuse.runtime.fusion import full_prefill, greedy_batch, prepare, run
from kvfuse.runtime.model import LoadedModel, load_model
from kvfuse.runtime.selectors import get_selector

from kvfuse.loader.quant import kv_codec
from kvfuse.pipeline.build import BuildConfig, build_cache
from .metrics import answer_agreement, answer_kls, bootstrap_ci, kl_per_position
from .suites import Example, Suite, fact_match, make_suite, needle_recall, squad_em_f1

RESULTS = "results.jsonl"
META = "meta.json"
REFERENCE = "full-prefill"  # the method name of the reference rows
OURS = "kvfuse"              # the method the paired table compares every other one with
# The store is built from the documents of the first max(n, CORPUS_EXAMPLES) examples, so that
# runs with different n (e.g. 50 at one ratio, 20 for a sweep) read the same enriched KV: a
# chunk's FusionRAG neighbours are chosen from the whole corpus, which would otherwise depend on n.
CORPUS_EXAMPLES = 50
ANSWER_KL_TOKENS = 32        # the answer KL covers at most this many tokens of the full prefill's answer
ROW_VERSION = 2              # rows of an older version (no answer KL) are redone on a rerun
METRICS = {"recall": "needle recall", "match": "fact match", "squad": "SQuAD F1 (EM also given)"}


@dataclass
class EvalConfig:
    suite: str
    model: str
    methods: list[str]
    ratios: list[float]
    n: int
    seed: int
    out: Path
    build: dict = field(default_factory=dict)   # extra BuildConfig fields (e.g. {"enrich": False})
    corpus_examples: int = CORPUS_EXAMPLES       # the store holds the documents of max(n, this) examples
    progress: bool = True
    kv_dtype: str = "model"  # "fp8", "int8" or "fp8,int8": also run every method on the store re-encoded so (`m@fp8`)

    def __post_init__(self):
        self.out = Path(self.out)
        for m in self.methods:
            get_selector(m)  # unknown names fail before any work
        if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios must be in [0, 1], got {self.ratios}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for name in self.kv_dtypes:
            kv_codec(name)

    @property
    def kv_dtypes(self) -> list[str]:
        """The quantised stores paired with the model-dtype one (none for "model")."""
        return [k for k in self.kv_dtype.split(",") if k and k != "model"]


# ----------------------------------------------------------------------------- scoring

def score(suite: Suite, ex: Example, answer: str) -> dict:
    if suite.metric == "recall":
        return {"score": needle_recall(answer, ex.answers)}
    if suite.metric == "match":
        return {"score": fact_match(answer, ex.answers)}
    em, f1 = squad_em_f1(answer, ex.answers)
    return {"score": f1, "em": em, "f1": f1}


def first_token_kl(full_logprobs: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(full || method) of the first generated token's distribution, in nats."""
    return float(kl_per_position(full_logprobs, logits.float().log_softmax(-1)))


# ----------------------------------------------------------------------------- the run

@functools.lru_cache(maxsize=None)
def selector_rev(method: str) -> str:
    """A short hash of the selector's module source, stored with each result row."""
    if method == REFERENCE:
        return ""
    module = sys.modules[get_selector(method.split("@")[0]).__module__]  # "kvfuse@fp8": kvfuse on the fp8 store
    return hashlib.sha1(Path(module.__file__).read_bytes()).hexdigest()[:10]


class _Results:
    """results.jsonl: one line per finished (example, method, ratio); read back on resume."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, str, float], dict] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file: another process may share the folder (e.g. one per ratio set)."""
        if not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: redo that one
                continue
            self.rows[(row["example"], row["method"], row["ratio"])] = row

    def has(self, ex: str, method: str, ratio: float, chunks: str | None = None) -> bool:
        """Done, by the selector code as it is now (a row from an edited selector is redone), with
        the current row fields (an older row without the answer KL is redone), and, given
        `chunks`, on the same stored chunks (a row from another build's KV is redone)."""
        row = self.rows.get((ex, method, ratio))
        if row is None or row.get("rev", selector_rev(method)) != selector_rev(method):
            return False
        if row.get("v", 1) < ROW_VERSION:
            return False
        return chunks is None or method == REFERENCE or row.get("chunks") == chunks

    def add(self, row: dict) -> None:
        self.rows[(row["example"], row["method"], row["ratio"])] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _stop_ids(lm: LoadedModel, suite: Suite) -> set[int]:
    if not suite.stop_on_newline:
        return set()
    vocab = lm.tokenizer.get_vocab()
    return {i for t, i in vocab.items() if "\n" in lm.tokenizer.convert_tokens_to_string([t])}


def evaluate(cfg: EvalConfig, lm: LoadedModel | None = None) -> dict:
    t_start = time.perf_counter()
    lm = lm or load_model(cfg.model)
    suite = make_suite(cfg.suite, lm.tokenizer, max(cfg.n, cfg.corpus_examples), cfg.seed)  # the store's corpus
    cfg.out.mkdir(parents=True, exist_ok=True)
    _check_meta(cfg)
    build = build_cache(suite.documents, cfg.out / "store", lm,
                        BuildConfig(chunk_tokens=suite.chunk_tokens, progress=cfg.progress, **cfg.build))
    inputs = ExampleInputs(FusionEngine(cfg.out / "store", lm, release=build.release, verify=False))
    stores = []  # (method suffix, inputs) of the quantised store: the same chunks, re-encoded (paired rows)
    for kv in cfg.kv_dtypes:
        quant = build_cache(suite.documents, cfg.out / "store", lm, BuildConfig(
            chunk_tokens=suite.chunk_tokens, progress=cfg.progress, **cfg.build, kv_dtype=kv))
        stores.append((f"@{kv}", ExampleInputs(FusionEngine(cfg.out / "store", lm, release=quant.release,
                                                                      verify=False))))
    results = _Results(cfg.out / RESULTS)
    (cfg.out / "full").mkdir(exist_ok=True)
    stop = _stop_ids(lm, suite)

    todo = [(m, r) for m in cfg.methods for r in cfg.ratios]
    for ex in tqdm(suite.examples[:cfg.n], desc=f"eval {cfg.suite}", unit="ex", disable=not cfg.progress):
        results.refresh()  # suites are prefix-stable in n: the first n of the corpus's examples
        chunk_ids = inputs.chunk_ids(ex)
        chunks_rev = chunks_digest(chunk_ids)
        extra = []
        for suffix, more in stores:
            ids = more.chunk_ids(ex)
            extra.append((more.engine.prefix, more.chunks(ids), [(m + suffix, r) for m, r in todo], chunks_digest(ids)))
        if all(results.has(ex.id, m, r, chunks_rev) for m, r in todo) and results.has(ex.id, REFERENCE, 1.0) \
                and all(results.has(ex.id, m, r, rev) for _, _, more_todo, rev in extra for m, r in more_todo):
            continue
        _run_example(lm, suite, ex, inputs.engine.prefix, inputs.chunks(chunk_ids), inputs.question_ids(ex),
                     todo, results, cfg.out / "full", stop, chunks_rev, extra)
    report = summarize(cfg, results.rows, build_seconds=build.seconds,
                       wall_seconds=time.perf_counter() - t_start)
    write_report(report, cfg.out)
    return report


class ExampleInputs:
    """What one example feeds the model from a built store: its chunks in retrieval order and
    its question ids as `FusionEngine.ask` formats them (plus the answer prefix, if any)."""

    def __init__(self, engine: FusionEngine):
        self.engine = engine
        self.by_doc: dict[str, list] = {}
        for rec in engine.records:
            self.by_doc.setdefault(rec.doc_id, []).append(rec)

    def chunk_ids(self, ex: Example) -> list[str]:
        missing = [d for d in ex.doc_ids if d not in self.by_doc]
        if missing:
            raise RuntimeError(f"{ex.id}: documents {missing} are not in the built store {self.engine.store.cache_dir}; "
                               "delete the store folder and rerun")
        return [r.chunk_id for d in ex.doc_ids for r in sorted(self.by_doc[d], key=lambda r: r.chunk_no)]

    def chunks(self, chunk_ids: list[str]) -> list:
        return [self.engine.store.read(c, verify=False) for c in chunk_ids]

    def question_ids(self, ex: Example) -> torch.Tensor:
        # the question part ends with the start of the answer, if any
        return self.engine.prompt.question_ids(self.engine.lm.tokenizer, ex.question, ex.answer_prefix or "")


def chunks_digest(chunk_ids: list[str]) -> str:
    """Identifies the stored KV an example read: chunk ids hash tokens and enrichment neighbours."""
    return hashlib.sha1(",".join(chunk_ids).encode()).hexdigest()[:10]


def _run_example(lm: LoadedModel, suite: Suite, ex: Example, prefix, chunks, q_ids: torch.Tensor,
                 todo: list[tuple[str, float]], results: _Results, full_dir: Path, stop: set[int],
                 chunks_rev: str | None = None, extra=()) -> None:
    """The full prefill and every missing method x ratio of one example; all their answers are
    decoded together in one batch (identical selections decode once), then every cache is
    teacher-forced along the full prefill's answer for the answer KL. extra: (prefix, chunks,
    todo, chunks_rev) of the same chunks from another store (`method@kv_dtype` rows), run
    against the same full prefill."""
    all_ids = torch.cat([prefix.tokens, *[c.tokens for c in chunks], q_ids.int()])
    n_context = sum(len(c.tokens) for c in chunks)
    full_path = full_dir / f"{ex.id}.pt"
    need_full = not results.has(ex.id, REFERENCE, 1.0) or not full_path.exists()
    t0 = time.perf_counter()
    full_cache, full_logits = full_prefill(lm, all_ids)  # every row needs it: the answer KL's reference
    full_ttft = time.perf_counter() - t0
    if need_full:
        torch.save(full_logits.log_softmax(-1), full_path)
    full_lp = torch.load(full_path)
    pending = [(full_cache, full_logits)]  # (cache, first logits) to decode; the full prefill first
    rows = []                         # (row, index of its answer in pending)
    for store_no, (prefix, chunks, todo, chunks_rev) in enumerate([(prefix, chunks, todo, chunks_rev), *extra]):
        prep = prepare(lm, prefix, chunks, q_ids)
        by_selection: dict[tuple, int] = {}  # per store: the same selection over other KV is another answer
        _run_methods(prep, ex, todo, results, chunks_rev, full_lp, n_context, pending, by_selection, rows)
    if not rows and not need_full:
        return
    decoded = greedy_batch(lm, [c for c, _ in pending], [l for _, l in pending], len(all_ids), ex.max_new_tokens, stop)
    answers = [lm.tokenizer.decode(t, skip_special_tokens=True).strip() for t in decoded]
    answer_kl = answer_kls(lm, pending, len(all_ids), decoded[0][:ANSWER_KL_TOKENS])
    if need_full:
        results.add({"example": ex.id, "kind": ex.kind, "method": REFERENCE, "ratio": 1.0, "v": ROW_VERSION,
                     "answer": answers[0], "answer_ids": decoded[0], **score(suite, ex, answers[0]), "kl": 0.0,
                     "answer_kl": 0.0, "answer_kl_max": 0.0, "agree": True, "n_context": n_context,
                     "n_recomputed": n_context, "ttft_s": full_ttft})
    for row, i in rows:
        results.add({"example": ex.id, "kind": ex.kind, **row, "v": ROW_VERSION, "answer": answers[i],
                     **score(suite, ex, answers[i]), "answer_kl": float(answer_kl[i].mean()),
                     "answer_kl_max": float(answer_kl[i].max()), "agree": bool(answer_agreement(decoded[i], decoded[0]))})


def _run_methods(prep, ex: Example, todo, results: _Results, chunks_rev, full_lp, n_context: int,
                 pending: list, by_selection: dict, rows: list) -> None:
    """Run every missing (method, ratio) of todo over one store's prepared example; append each
    new answer's (cache, logits) to pending and its row to rows. A method named `m@fp8` runs
    selector m (the store tells the KV apart)."""
    for method, ratio in todo:
        if results.has(ex.id, method, ratio, chunks_rev):
            continue
        res = run(prep, method.split("@")[0], ratio)
        key = (tuple(res.recomputed.tolist()), tuple(res.layer_counts or ()),
               tuple(res.kept.tolist()) if res.kept is not None else ())   # a layer plan narrows with depth
        if key not in by_selection:
            by_selection[key] = len(pending)
            pending.append((res.cache, res.logits))
        rows.append(({"method": method, "ratio": ratio, "rev": selector_rev(method), "chunks": chunks_rev, "kl": first_token_kl(full_lp, res.logits),
                      "n_context": n_context, "n_recomputed": res.n_recomputed,
                      "ttft_s": res.timings["select_s"] + res.timings["recompute_s"],
                      "select_s": res.timings["select_s"],
                      **({"layer_counts": res.layer_counts} if res.layer_counts is not None else {})}, by_selection[key]))


def _check_meta(cfg: EvalConfig) -> None:
    """One output folder holds one suite x model x seed x build: refuse to mix results."""
    meta = {"suite": cfg.suite, "model": cfg.model, "seed": cfg.seed, "build": cfg.build,
            "corpus_examples": cfg.corpus_examples}
    if cfg.kv_dtype != "model":  # absent otherwise: older run folders stay valid
        meta["kv_dtype"] = cfg.kv_dtype
    path = cfg.out / META
    if path.exists():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{cfg.out} holds results of {old}, not {meta}; use another --out folder")
        commands = old.get("commands", [])
    else:
        commands = []
    meta["commands"] = list(dict.fromkeys(commands + [command_line(cfg)]))
    meta["machine"] = machine()  # of the run (a later --report-only keeps it)
    path.write_text(json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------- the report

def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _sem(xs) -> float:
    xs = list(xs)
    if len(xs) < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarize(cfg: EvalConfig, rows: dict, build_seconds: float = 0.0, wall_seconds: float = 0.0) -> dict:
    """Per method x ratio over the examples that have both the method's row and the full prefill's."""
    meta = json.loads((cfg.out / META).read_text())
    full = {k[0]: v for k, v in rows.items() if k[1] == REFERENCE}
    table = []
    for method, ratio in sorted({k[1:] for k in rows if k[1] != REFERENCE}, key=lambda k: (k[1], k[0])):
        got = [v for k, v in rows.items() if k[1] == method and k[2] == ratio and k[0] in full]
        if not got:
            continue
        ref = [full[v["example"]] for v in got]
        full_score = _mean(r["score"] for r in ref)
        entry = {
            "method": method, "ratio": ratio, "n": len(got),
            "score": _mean(v["score"] for v in got), "score_sem": _sem(v["score"] for v in got),
            "full_score": full_score,
            "retention": _mean(v["score"] for v in got) / full_score if full_score else float("nan"),
            "kl": _mean(v["kl"] for v in got), "kl_sem": _sem(v["kl"] for v in got),
            "kl_median": statistics.median(v["kl"] for v in got),
            "agreement": _mean(float(v["agree"]) for v in got),
            "recomputed": _mean(v["n_recomputed"] for v in got),
            "recomputed_frac": _mean(v["n_recomputed"] / v["n_context"] for v in got),
            "ttft_s": _mean(v["ttft_s"] for v in got), "full_ttft_s": _mean(r["ttft_s"] for r in ref),
        }
        if all("answer_kl" in v for v in got):  # rows of an older harness have no answer KL
            entry.update(answer_kl=_mean(v["answer_kl"] for v in got), answer_kl_sem=_sem(v["answer_kl"] for v in got))
        if cfg.suite == "squad":
            entry.update(em=_mean(v["em"] for v in got), f1=entry["score"],
                         full_em=_mean(r["em"] for r in ref), full_f1=full_score)
        table.append(entry)
    return {
        "suite": cfg.suite, "model": cfg.model, "seed": cfg.seed, "n_requested": cfg.n,
        "paired": [p for p in paired(rows) if "@" not in p["other"]],
        "kv_dtype": cfg.kv_dtype,
        "kv_paired": kv_paired(rows),
        "metric": metric_name(cfg.suite),
        "commands": meta.get("commands", []),
        "machine": meta.get("machine") or machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "build": cfg.build, "build_seconds": build_seconds, "wall_seconds": wall_seconds,
        "full": {"n": len(full), "score": _mean(v["score"] for v in full.values()),
                 "ttft_s": _mean(v["ttft_s"] for v in full.values()),
                 "context_tokens": _mean(v["n_context"] for v in full.values())},
        "results": table,
    }


def metric_name(suite: str) -> str:
    return METRICS[{"niah": "recall", "xchunk": "recall", "facts": "match"}.get(suite, "squad")]


def paired(rows: dict, ours: str = OURS) -> list[dict]:
    """`ours` against every other method at each ratio, on the examples both ran.

    Per-example differences cancel the example-to-example spread that dominates
    each method's own SEM, so this is the comparison that can tell a real lead
    from a tie. kl_gain = mean(KL_other - KL_ours) (> 0: ours is closer to the
    full prefill), answer_kl_gain the same for the answer KL; score_gain =
    mean(score_ours - score_other), agree_gain the same for whole-answer agreement;
    each with its paired bootstrap 95% interval (`*_ci`); wins/losses count the
    examples where ours has the lower / higher KL.
    """
    by_key: dict[tuple[str, float], dict[str, dict]] = {}
    for (ex, method, ratio), row in rows.items():
        by_key.setdefault((ex, ratio), {})[method] = row
    out = []
    for ratio in sorted({r for _, r in by_key}):
        others = sorted({m for (_, r), d in by_key.items() if r == ratio for m in d} - {ours, REFERENCE})
        for other in others:
            pairs = [(d[ours], d[other]) for (_, r), d in by_key.items() if r == ratio and ours in d and other in d]
            if not pairs:
                continue
            gains = {"kl_gain": [o["kl"] - u["kl"] for u, o in pairs],
                     "score_gain": [u["score"] - o["score"] for u, o in pairs]}
            if all("answer_kl" in u and "answer_kl" in o for u, o in pairs):
                gains["answer_kl_gain"] = [o["answer_kl"] - u["answer_kl"] for u, o in pairs]
                gains["agree_gain"] = [float(u["agree"]) - float(o["agree"]) for u, o in pairs]
            entry = {"ratio": ratio, "ours": ours, "other": other, "n": len(pairs)}
            for name, g in gains.items():
                entry.update({name: _mean(g), f"{name}_sem": _sem(g), f"{name}_ci": list(bootstrap_ci(g))})
            kl_gain = gains["kl_gain"]
            entry.update(kl_wins=sum(g > 0 for g in kl_gain), kl_losses=sum(g < 0 for g in kl_gain))
            out.append(entry)
    return out


def kv_paired(rows: dict) -> list[dict]:
    """Each `m@kv` (method m over the store re-encoded as kv: fp8, int8) against m over the
    model-dtype store, on the same examples: the accuracy cost of quantised KV.

    kl_increase = mean(KL_m@kv − KL_m) (first token, nats) and answer_kl_increase likewise;
    retention_drop = 100 · (mean score_m − mean score_m@kv) / mean full-prefill score, in
    points of retention; agree_drop the same for whole-answer agreement (points); each with
    its paired bootstrap 95% interval (`*_ci`).
    """
    full = {ex: row for (ex, method, _), row in rows.items() if method == REFERENCE}
    out = []
    for quant, ratio in sorted({(m, r) for _, m, r in rows if "@" in m}):
        base, kv = quant.split("@", 1)
        pairs = [(rows[(ex, base, ratio)], row, full[ex]) for (ex, m, r), row in rows.items()
                 if m == quant and r == ratio and (ex, base, ratio) in rows and ex in full]
        if not pairs:
            continue
        full_score = _mean(f["score"] for *_, f in pairs)
        scale = 100 / full_score if full_score else float("nan")
        d_kl = [q["kl"] - b["kl"] for b, q, _ in pairs]
        d_score = [(b["score"] - q["score"]) * scale for b, q, _ in pairs]
        d_agree = [100 * (float(b["agree"]) - float(q["agree"])) for b, q, _ in pairs]
        entry = {"method": base, "kv_dtype": kv, "ratio": ratio, "n": len(pairs), "full_score": full_score,
                 "kl": _mean(b["kl"] for b, _, _ in pairs), "kl_quant": _mean(q["kl"] for _, q, _ in pairs),
                 "retention": _mean(b["score"] for b, _, _ in pairs) * scale / 100,
                 "retention_quant": _mean(q["score"] for _, q, _ in pairs) * scale / 100}
        diffs = {"kl_increase": d_kl, "retention_drop": d_score, "agree_drop": d_agree}
        if all("answer_kl" in b and "answer_kl" in q for b, q, _ in pairs):
            diffs["answer_kl_increase"] = [q["answer_kl"] - b["answer_kl"] for b, q, _ in pairs]
        for name, d in diffs.items():
            entry.update({name: _mean(d), f"{name}_ci": list(bootstrap_ci(d))})
        out.append(entry)
    return out


def cell(p: dict, name: str, digits: int = 3) -> str:
    """`value [lo, hi]` of a paired entry's `name` and its `name_ci`; "–" where it has none."""
    if name not in p:
        return "–"
    lo, hi = p[f"{name}_ci"]
    return f"{p[name]:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _kv_paired_markdown(report: dict) -> list[str]:
    pairs = report.get("kv_paired") or []
    if not pairs:
        return []
    lines = ["", "Quantised KV against the model-dtype store, same examples and selections' method (paired): "
             "KL increase = mean(KL_m@kv − KL_m) in nats; retention drop = (score_m − score_m@kv) / full score, "
             "in points; agreement drop in points; [lo, hi] the paired bootstrap 95% interval.", "",
             "| method | KV | ratio | n | KL m | KL m@kv | KL increase | answer KL increase | retention m | "
             "retention m@kv | retention drop (pts) | agreement drop (pts) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    for p in pairs:
        lines.append(f"| {p['method']} | {p['kv_dtype']} | {p['ratio']:.2f} | {p['n']} | {p['kl']:.4f} | "
                     f"{p['kl_quant']:.4f} | {cell(p, 'kl_increase', 4)} | {cell(p, 'answer_kl_increase', 4)} | "
                     f"{p['retention']:.3f} | {p['retention_quant']:.3f} | {cell(p, 'retention_drop', 1)} | "
                     f"{cell(p, 'agree_drop', 1)} |")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s) per process, "
            f"torch {torch.__version__}, CPU only")


def rewrite_report(out: Path) -> list[Path]:
    """Rebuild the report of a run folder from its results.jsonl (no model needed)."""
    out = Path(out)
    meta = json.loads((out / META).read_text())
    cfg = EvalConfig(suite=meta["suite"], model=meta["model"], methods=[], ratios=[0.0], n=1, seed=meta["seed"],
                     out=out, build=meta["build"], corpus_examples=meta.get("corpus_examples", CORPUS_EXAMPLES),
                     kv_dtype=meta.get("kv_dtype", "model"))
    return write_report(summarize(cfg, _Results(out / RESULTS).rows), out)


def command_line(cfg: EvalConfig) -> str:
    cmd = (f"kvfuse eval --suite {cfg.suite} --model {cfg.model} --methods {','.join(cfg.methods)} "
           f"--ratios {','.join(str(r) for r in cfg.ratios)} --n {cfg.n} --seed {cfg.seed} --out {cfg.out}")
    if cfg.build.get("enrich") is False:
        cmd += " --no-enrich"
    if cfg.kv_dtype != "model":
        cmd += f" --kv-dtype {cfg.kv_dtype}"
    if cfg.corpus_examples != CORPUS_EXAMPLES:
        cmd += f" --corpus-examples {cfg.corpus_examples}"
    return cmd


def report_name(report: dict) -> str:
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(report["model"]).name)
    store = "isolated" if report["build"].get("enrich") is False else "enriched"
    kv = report.get("kv_dtype", "model")
    return f"accuracy-{report['suite']}-{model}-{store}" + (f"-{kv.replace(',', '-')}" if kv != "model" else "")


def markdown(report: dict) -> str:
    squad = report["suite"] == "squad"
    head = ["method", "ratio", "n", "F1" if squad else ("match" if report["suite"] == "facts" else "recall")] + (["EM"] if squad else []) + \
        ["retention", "KL(full‖m)", "KL median", "answer KL", "agree", "recomputed", "TTFT s"]
    store = "isolated chunks (--no-enrich)" if report["build"].get("enrich") is False else "enriched chunks (FusionRAG neighbours)"
    for kv in (k for k in report.get("kv_dtype", "model").split(",") if k != "model"):
        store += f"; `<method>@{kv}`: the same chunks stored as {kv}"
    lines = [f"# Accuracy: {report['suite']} on {report['model']}, store of {store}", "",
             *[f"- command: `{c}`" for c in report["commands"]], f"- machine: {report['machine']}", f"- date: {report['date']}",
             f"- full prefill: {report['metric']} {report['full']['score']:.3f} over {report['full']['n']} examples, "
             f"mean context {report['full']['context_tokens']:.0f} tokens, TTFT {report['full']['ttft_s']:.2f} s",
             f"- build {report['build_seconds']:.0f} s, wall {report['wall_seconds'] / 60:.1f} min (this invocation)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in sorted(report["results"], key=lambda e: (e["ratio"], e["method"])):
        cells = [e["method"], f"{e['ratio']:.2f}", str(e["n"]), f"{e['score']:.3f} ± {e['score_sem']:.3f}"]
        if squad:
            cells.append(f"{e['em']:.3f}")
        answer_kl = f"{e['answer_kl']:.3f} ± {e['answer_kl_sem']:.3f}" if "answer_kl" in e else "–"
        cells += [f"{e['retention'] * 100:.1f}%", f"{e['kl']:.3f} ± {e['kl_sem']:.3f}", f"{e['kl_median']:.3f}", answer_kl,
                  f"{e['agreement'] * 100:.0f}%",
                  f"{e['recomputed']:.0f} ({e['recomputed_frac'] * 100:.1f}%)", f"{e['ttft_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _paired_markdown(report)
    lines += _kv_paired_markdown(report)
    lines += ["", "± is one standard error of the mean. Retention = score / full-prefill score on the same examples; "
              "KL is the first generated token's KL(full ‖ method) in nats; answer KL the mean per-token "
              f"KL(full ‖ method) teacher-forced along the full prefill's greedy answer (first {ANSWER_KL_TOKENS} tokens); "
              "agree = whole greedy answer identical to the full prefill's; TTFT = selection (including any "
              "probe pass) + recompute, without loading."]
    return "\n".join(lines) + "\n"


def _paired_markdown(report: dict) -> list[str]:
    pairs = report.get("paired") or []
    if not pairs:
        return []
    ours = pairs[0]["ours"]
    lines = ["", f"{ours} against each method on the same examples (paired): KL gain = mean(KL_method − KL_{ours}), "
             f"> 0 means {ours} is closer to the full prefill; answer-KL gain the same for the answer KL; score and "
             f"agreement gains = {ours} − method. [lo, hi] is the paired bootstrap 95% interval: one that excludes 0 "
             "is a real lead or lag, one that holds 0 a tie.", "",
             "| ratio | versus | n | KL gain | answer-KL gain | score gain | agree gain | lower KL on |",
             "|---|---|---|---|---|---|---|---|"]

    for p in pairs:
        lines.append(f"| {p['ratio']:.2f} | {p['other']} | {p['n']} | {cell(p, 'kl_gain')} | {cell(p, 'answer_kl_gain')} | "
                     f"{cell(p, 'score_gain')} | {cell(p, 'agree_gain', 2)} | {p['kl_wins']}/{p['n']} (worse on {p['kl_losses']}) |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(e["method"] for e in report["results"]):
        pts = sorted((e["ratio"], e["score"], e.get("answer_kl", e["kl"])) for e in report["results"] if e["method"] == method)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=method)
    ax1.axhline(report["full"]["score"], color="black", ls="--", lw=1, label="full prefill")
    ax1.set(xlabel="recompute ratio", ylabel=report["metric"], title=f"{report['suite']} · {report['model']}")
    answer = all("answer_kl" in e for e in report["results"])
    ax2.set(xlabel="recompute ratio", ylabel=f"{'answer' if answer else 'first-token'} KL(full‖method), nats",
            yscale="log", title="divergence")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> list[Path]:
    paths = [out / f"{report_name(report)}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths
