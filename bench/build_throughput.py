"""Build throughput (tokens/s) against plain model prefill on the same machine (issue 4).

    python bench/build_throughput.py cpu --tokens 8192 --rounds 3      # smollm2-135m, in-process + Dask
    python bench/build_throughput.py gpu --shape llama3-8b --chunks 64  # random bf16 weights, Dask --gpus 1

"plain prefill" runs the bare decoder over the same chunks (batch 1, KV kept,
no logits), in the same process as the build's model. Builds and plain prefill
are interleaved (plain, isolated, plain, enriched, ...) so both see the same
machine load; the load average is recorded around each measurement. Throughput
counts the chunk tokens stored; `prefilled` counts every token the model ran
(embedding pass, isolated pass for kv_deviation, neighbours).

Writes <out>.json and <out>.md (command, machine, date, per-round numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvfuse.pipeline.build import BuildConfig, BuildReport, build_cache, chunk_docs
from kvfuse.pipeline.corpus import Document
from kvfuse.bench.shapes import SHAPES

@dataclass(frozen=True)
class RandomModelLoader:
    """A worker-side loader (kvfuse.pipeline.dask_job): a real model shape with random bf16 weights
    (`kvfuse.bench.shapes`), made on the device, and the tests' small WordLevel tokenizer (ids < any vocab)."""

    shape: str = "llama3-8b"
    dtype: str = "bfloat16"
    seed: int = 0

    def __call__(self, device: str):
        from kvfuse.bench.shapes import build_random_model
        from kvfuse.runtime.model import check_rope_additive
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_tokenizer

        lm = build_random_model(self.shape, device=device, dtype=getattr(torch, self.dtype), seed=self.seed)
        check_rope_additive(lm.model.config)
        lm.tokenizer = make_tiny_tokenizer()
        return lm


def random_docs(n_docs: int, words: int, seed: int = 0) -> list[Document]:
    """Docs of random words from the tiny tokenizer's vocabulary (one token per word)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import WORDS
    rng = random.Random(seed)
    vocab = [w for w in WORDS if w.isalpha()]
    return [Document(f"doc{i:04d}", " ".join(rng.choice(vocab) for _ in range(words))) for i in range(n_docs)]


@torch.inference_mode()
def plain_prefill(lm, token_lists) -> dict:
    """The bare decoder over each token list (batch 1, use_cache like the build keeps KV)."""
    from transformers.cache_utils import DynamicCache

    from kvfuse.runtime.model import cache_kwargs
    device = lm.model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for ids in token_lists:
        lm.model.model(input_ids=torch.tensor(ids, device=device)[None], **cache_kwargs(lm.model.model, DynamicCache()), use_cache=True)
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(len(t) for t in token_lists)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _build_row(kind: str, r: BuildReport) -> dict:
    pre = r.stage_seconds.get("precompute", 0.0)
    return {"kind": kind, "tokens": r.tokens, "prefilled": r.prefilled, "seconds": r.seconds,
            "tokens_per_s": r.tokens / r.seconds, "precompute_tokens_per_s": r.tokens / pre if pre else None,
            "stage_seconds": r.stage_seconds, "chunks": r.chunks}


def _machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus_visible"] = torch.cuda.device_count()
    return info


def run_cpu(args) -> dict:
    from kvfuse.runtime.model import load_model
    from kvfuse.pipeline.samples import paul_graham_essays
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    docs, total = [], 0
    for doc in paul_graham_essays():
        n = len(lm.tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if total + n > args.tokens and docs:
            break
        docs.append(doc)
        total += n
    chunks = [c.token_ids for c in chunk_docs(lm, docs, 512)]
    plain_prefill(lm, chunks[:2])  # warm-up
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="kvfuse-bench-"))
    try:
        for rnd in range(args.rounds):
            for kind, cfg in (("isolated", _config(args, enrich=False)), ("enriched", _config(args, enrich=True))):
                load = os.getloadavg()[0]
                plain = plain_prefill(lm, chunks)
                rows.append({"round": rnd, "kind": "plain", **plain, "load1": load})
                load = os.getloadavg()[0]
                report = build_cache(docs, tmp / f"{kind}{rnd}", lm, cfg)
                rows.append({"round": rnd, **_build_row(kind, report), "load1": load,
                             "vs_plain": report.tokens / report.seconds / plain["tokens_per_s"]})
                shutil.rmtree(tmp / f"{kind}{rnd}")
        if args.dask:
            from kvfuse.pipeline.dask_job import ClusterConfig, ModelLoader, build_on_dask, open_client
            cluster = ClusterConfig(workers=1, torch_threads=args.threads)
            with open_client(cluster) as client:
                build_on_dask(client, docs[:1], tmp / "warm", ModelLoader(args.model), _config(args, enrich=False), cluster)
                plain = plain_prefill(lm, chunks)
                rows.append({"round": "dask", "kind": "plain", **plain, "load1": os.getloadavg()[0]})
                report = build_on_dask(client, docs, tmp / "dask", ModelLoader(args.model), _config(args, enrich=False),
                                       cluster)
                rows.append({"round": "dask", **_build_row("isolated (Dask, 1 worker)", report),
                             "load1": os.getloadavg()[0], "vs_plain": report.tokens / report.seconds / plain["tokens_per_s"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"model": args.model, "corpus": f"{len(docs)} Paul Graham essays, {len(chunks)} chunks of <= 512 tokens",
            "torch_threads": torch.get_num_threads(), "shard_writers": args.shard_writers, "rows": rows}


def run_gpu(args) -> dict:
    from kvfuse.pipeline.dask_job import ClusterConfig, build_on_dask, open_client

    loader = RandomModelLoader(args.shape)
    docs = random_docs(args.chunks // 4, 4 * 500)  # ~4 chunks of <= 512 tokens per doc
    cluster = ClusterConfig(gpus=args.gpus, **({"task_tokens": args.task_tokens} if args.task_tokens else {}))
    rows = []
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="kvfuse-bench-"))
    disk_gbps = disk_write_gbps(tmp)
    print(f"disk write with fsync: {disk_gbps:.2f} GB/s", flush=True)
    with open_client(cluster) as client:
        t0 = time.perf_counter()
        build_on_dask(client, docs[:1], tmp / "warm", loader, _config(args, enrich=True), cluster)
        rows.append({"kind": "warm-up (model load + 1 doc)", "seconds": time.perf_counter() - t0})
        gpu = {"resources": {"GPU": 1}} if args.gpus else {}
        chunks = client.submit(_worker_chunks, docs, pure=False, **gpu).result()
        for rnd in range(args.rounds):
            for kind, cfg in (("isolated", _config(args, enrich=False)), ("enriched", _config(args, enrich=True))):
                plain = client.submit(_worker_plain, chunks, pure=False, **gpu).result()
                rows.append({"round": rnd, "kind": "plain", **plain})
                report = build_on_dask(client, docs, tmp / f"{kind}{rnd}", loader, cfg, cluster)
                rows.append({"round": rnd, **_build_row(kind, report),
                             "vs_plain": report.tokens / report.seconds / plain["tokens_per_s"],
                             "precompute_vs_plain": report.tokens / report.stage_seconds["precompute"] / plain["tokens_per_s"]})
                print(json.dumps(rows[-2:]), flush=True)
                shutil.rmtree(tmp / f"{kind}{rnd}")
    shutil.rmtree(tmp, ignore_errors=True)
    return {"model": f"{args.shape} shape, random bf16 weights", "gpus": args.gpus, "shard_writers": args.shard_writers,
            "kv_dtype": args.kv_dtype, "disk_write_gbps": disk_gbps,
            "corpus": f"{len(docs)} docs of random words, {len(chunks)} chunks of <= 512 tokens", "rows": rows}


def disk_write_gbps(folder: Path, nbytes: int = 2 << 30) -> float:
    """This disk's sequential write rate with fsync (GB/s), through the page cache as the shard
    writers write: a build that stores K bytes per token can never beat disk_write / K tokens/s."""
    folder.mkdir(parents=True, exist_ok=True)
    path, block = folder / "disk-probe.bin", os.urandom(64 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / seconds / 1e9


def _config(args, enrich: bool) -> BuildConfig:
    return BuildConfig(enrich=enrich, progress=False, shard_writers=args.shard_writers,
                       kv_dtype=getattr(args, "kv_dtype", "model"))


def _worker_chunks(docs):
    from kvfuse.pipeline.dask_job import _plugin
    return [c.token_ids for c in chunk_docs(_plugin().model(), docs, 512)]


def _worker_plain(chunks):
    from kvfuse.pipeline.dask_job import _plugin
    lm = _plugin().model()
    plain_prefill(lm, chunks[:2])  # warm-up
    return plain_prefill(lm, chunks)


def summarize(result: dict) -> dict:
    rows = [r for r in result["rows"] if isinstance(r.get("round"), int)]
    out = {}
    for kind in ("plain", "isolated", "enriched"):
        vals = [r["tokens_per_s"] for r in rows if r["kind"] == kind]
        if vals:
            out[f"{kind}_tokens_per_s_median"] = statistics.median(vals)
    for kind in ("isolated", "enriched"):
        vals = [r["vs_plain"] for r in rows if r["kind"] == kind]
        if vals:
            out[f"{kind}_vs_plain_median"] = statistics.median(vals)
    if "isolated_tokens_per_s_median" in out and "enriched_tokens_per_s_median" in out:
        out["enrichment_slowdown"] = out["isolated_tokens_per_s_median"] / out["enriched_tokens_per_s_median"]
    return out


def write_results(result: dict, out: Path, command: str) -> None:
    result = {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": _machine(), **result, "summary": summarize(result)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    lines = [f"# Build throughput: {result['model']}", "", f"- command: `{command}`", f"- date: {result['date']}",
             f"- machine: {json.dumps(result['machine'])}", f"- corpus: {result['corpus']}",
             *([f"- KV stored as: {result['kv_dtype']}; this disk writes {result['disk_write_gbps']:.2f} GB/s with fsync"]
               if "disk_write_gbps" in result else []), "",
             "| round | kind | tokens | prefilled | seconds | tok/s | vs plain | precompute tok/s | load1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fmt = lambda v, p=1: "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))
        lines.append(f"| {r.get('round', '')} | {r['kind']} | {r.get('tokens', '')} | {r.get('prefilled', '')} | "
                     f"{fmt(r.get('seconds'), 2)} | {fmt(r.get('tokens_per_s'))} | {fmt(r.get('vs_plain'), 2)} | "
                     f"{fmt(r.get('precompute_tokens_per_s'))} | {fmt(r.get('load1'), 2)} |")
    lines += ["", "Summary: " + ", ".join(f"{k} = {v:.3g}" for k, v in result["summary"].items()), ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    cpu = sub.add_parser("cpu")
    cpu.add_argument("--model", default="smollm2-135m")
    cpu.add_argument("--tokens", type=int, default=8192, help="corpus size (chunk tokens)")
    cpu.add_argument("--rounds", type=int, default=3)
    cpu.add_argument("--dask", action="store_true", help="also an isolated build through a 1-worker LocalCluster")
    cpu.add_argument("--threads", type=int, default=None,
                     help="torch threads for both plain prefill and the build (1 is steadiest on a shared machine)")
    cpu.add_argument("--out", default="bench/results/build_throughput_cpu")
    cpu.add_argument("--shard-writers", type=int, default=BuildConfig.shard_writers,
                     help="threads writing shards while the model computes (BuildConfig.shard_writers)")
    gpu = sub.add_parser("gpu")
    gpu.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    gpu.add_argument("--chunks", type=int, default=64)
    gpu.add_argument("--task-tokens", type=int, default=None, help="prefill tokens per Dask precompute task "
                     "(default: ClusterConfig's)")
    gpu.add_argument("--gpus", type=int, default=1)
    gpu.add_argument("--rounds", type=int, default=2)
    gpu.add_argument("--workdir", default=None, help="where the caches are built (default: a temp folder)")
    gpu.add_argument("--out", default="bench/results/build_throughput_gpu")
    gpu.add_argument("--kv-dtype", default="model", choices=["model", "fp8", "int8"],
                     help="how the stores hold KV (fp8 / int8 write half the bytes of bf16)")
    gpu.add_argument("--shard-writers", type=int, default=BuildConfig.shard_writers,
                     help="threads writing shards while the model computes (BuildConfig.shard_writers)")
    args = p.parse_args(argv)
    result = run_cpu(args) if args.mode == "cpu" else run_gpu(args)
    write_results(result, Path(args.out), "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
