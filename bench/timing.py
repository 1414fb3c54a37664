"""Timing helpers shared by the benchmarks: device sync, medians, host->GPU ceilings, environment."""

from __future__ import annotations

import platform
import statistics
import time
from importlib.metadata import version

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int = 3, warmup: int = 1) -> tuple[list[float], object]:
    """Run fn warmup + reps times; returns the wall times in ms (synchronised) and fn's last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return float(xs[k])


def host_to_gpu_gbps(nbytes: int = 1 << 30, reps: int = 5, device="cuda") -> dict:
    """The host->GPU copy ceilings of this machine: one large copy from pinned and from pageable memory."""
    if torch.device(device).type != "cuda":
        return {"pinned_gbps": float("nan"), "pageable_gbps": float("nan"), "bytes": nbytes}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {"bytes": nbytes}
    for name, pin in (("pinned_gbps", True), ("pageable_gbps", False)):
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory() if pin else \
            torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        times = []
        for _ in range(reps + 1):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=pin)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        out[name] = nbytes / (median(times[1:]) * 1e-3) / 1e9
        del src
    return out


def environment(device) -> dict:
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": version("transformers"), "host": platform.node(),
           "cpu_count": __import__("os").cpu_count()}
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, device_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env["device"] = "cpu"
    return env
