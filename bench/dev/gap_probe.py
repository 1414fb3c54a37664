"""Dev tool (issue 11): where the compute stream idles during one warm fused prefill.

    python3 bench/dev/gap_probe.py --out DIR [--kv-dtype fp8] [--context 16384] [--runs 3]

Profiles `runs` warm requests of the Llama-3-8B shape through the bench's runner and
reads the Chrome trace back (`analyse`): per pass, how long the compute stream ran
kernels and how long it idled waiting for the host or for an event. Writes
gaps_<kv-dtype>.json and the gzipped trace under --out. Not a product path.
(`python3 bench/dev/gap_probe.py --analyse TRACE.json.gz` reads a trace already taken.)
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def analyse(trace_path: Path, split_ms: float = 3.0, min_gap_us: float = 20.0) -> dict:
    """Per pass (the compute stream's work between idle stretches longer than split_ms: the
    request's open, each repair pass, the recompute): span, busy and idle time, the idle
    split into host-bound gaps (the kernel that ended the gap was launched after the gap
    began) and device waits (launched before: an event, e.g. the layer-wise load), and the
    host's CUDA API time. The engine runs requests on a worker thread, whose Python ops the
    profiler does not record: the CUDA runtime calls (all threads) are what is left."""
    with gzip.open(trace_path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    streams = defaultdict(int)
    for e in gpu:
        if e["cat"] == "kernel":
            streams[e["args"].get("stream")] += 1
    compute = max(streams, key=streams.get)
    work = sorted((e for e in gpu if e["args"].get("stream") == compute), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    passes, handovers = [[work[0]]], []
    for a, b in zip(work, work[1:]):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > split_ms * 1e3:
            passes.append([])
            handovers.append(round(gap / 1e3, 2))
        passes[-1].append(b)
    out = {"compute_stream": compute, "handovers_ms": handovers, "passes": []}
    for p in passes:
        end, busy, idle = p[0]["ts"], 0.0, defaultdict(float)
        for e in p:
            s, t = e["ts"], e["ts"] + e["dur"]
            if s - end >= min_gap_us:
                launch = launches.get(e["args"].get("correlation"))
                idle["host" if (launch["ts"] if launch else s) > end else "device_wait"] += s - end
            if t > end:
                busy += t - max(s, end)
                end = t
        out["passes"].append({"span_ms": round((end - p[0]["ts"]) / 1e3, 2), "busy_ms": round(busy / 1e3, 2),
                              "kernels": len(p), **{f"idle_{k}_ms": round(v / 1e3, 2) for k, v in idle.items()}})
    api = defaultdict(float)
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            api[e["name"]] += e["dur"]
    out["cuda_api_ms"] = {k: round(v / 1e3, 2) for k, v in sorted(api.items(), key=lambda kv: -kv[1])[:12]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--analyse", help="only read this trace (.json.gz) and print its passes")
    ap.add_argument("--kv-dtype", default="model")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--selector", default="kvfuse")
    args = ap.parse_args()
    if args.analyse:
        print(json.dumps(analyse(Path(args.analyse)), indent=1))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from kvfuse.bench import ttft

    captured = {}

    def profile_run(runner, request, ratio, path):     # replaces the bench's: labels, several runs, our analysis
        runner.fused(request, ratio, "warm")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.runs):
                runner.fused(request, ratio, "warm")
                torch.cuda.synchronize()
        trace = out / f"gaps_{args.kv_dtype}.trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
            g.write(f.read())
        trace.unlink()
        captured["gaps"] = analyse(Path(f"{trace}.gz"))
        return ""

    ttft.profile_run = profile_run
    cfg = ttft.TTFTConfig(shapes=("llama3-8b",), contexts=(args.context,), ratios=(args.ratio,), reps=3,
                          selector=args.selector, compare_selectors=(), kv_dtype=args.kv_dtype, cold_reps=1,
                          profile=f"llama3-8b:{args.context}:{args.ratio}", out_dir=str(out / "bench"))
    result = ttft.run_ttft(cfg, command="bench/dev/gap_probe.py")
    row = result["shapes"][0]["rows"][0]
    captured["warm_ms"] = row["warm"].get("runs_ms")
    (out / f"gaps_{args.kv_dtype}.json").write_text(json.dumps(captured, indent=1))
    print(json.dumps(captured, indent=1))


if __name__ == "__main__":
    main()
