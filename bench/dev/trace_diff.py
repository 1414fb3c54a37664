"""Dev tool: host-side op counts and times of two torch.profiler Chrome traces (gzipped), side by side.

    python3 bench/dev/trace_diff.py A.trace.json.gz B.trace.json.gz [--top 40]

Sums each CPU op's and CUDA runtime call's count and wall time (us) per trace, and prints
the names whose time differs most between A and B. Not a product path.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def totals(path: str) -> dict:
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    out: dict = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("cpu_op", "cuda_runtime", "kernel", "gpu_memcpy"):
            continue
        key = f"{e['cat']}: {e['name'][:70]}"
        out[key][0] += 1
        out[key][1] += float(e.get("dur", 0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    a, b = totals(args.a), totals(args.b)
    keys = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, [0, 0.0])[1] - a.get(k, [0, 0.0])[1]))
    print(f"{'op':80s} {'n A':>7s} {'n B':>7s} {'ms A':>9s} {'ms B':>9s}")
    for k in keys[:args.top]:
        na, ta = a.get(k, [0, 0.0])
        nb, tb = b.get(k, [0, 0.0])
        print(f"{k:80s} {na:7d} {nb:7d} {ta / 1e3:9.2f} {tb / 1e3:9.2f}")


if __name__ == "__main__":
    main()
