"""In-process profile of the isolated build's compute loop (issue 14 device probe)."""
import os, time, torch, json
from pathlib import Path
from kvfuse.bench.build_throughput import RandomModelLoader
from kvfuse.pipeline.build import BuildContext, Job, compute_jobs
from kvfuse.loader import format as fmt
lm = RandomModelLoader()("cuda")
ctx = BuildContext.of(lm)
meta = ctx.shard_metadata(); meta["kv_dtype"] = os.environ.get("KVD", "fp8")
jobs = [Job(f"c{i}", tuple(torch.randint(5, 60, (512,)).tolist())) for i in range(64)]
out = Path("/dev/shm/probe")
def go(tag, n=64, **kw):
    import shutil; shutil.rmtree(out, ignore_errors=True); (out / "shards").mkdir(parents=True)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    compute_jobs(lm, ctx.prefix_ids, jobs[:n], out, meta, 1 << 30, **kw)
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
    print(f"{tag:30s} {n*512/dt:8.0f} tok/s ({dt:.2f} s)", flush=True)
go("warm-up", 8)
for kvd in ("fp8", "model"):
    meta["kv_dtype"] = kvd
    go(f"compute_jobs {kvd} batch4")
    go(f"compute_jobs {kvd} batch1", batch=1)
    go(f"compute_jobs {kvd} batch8", batch=8)
meta["kv_dtype"] = "fp8"
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    go("profiled fp8", 32)
tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
tab2 = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
print(tab); print(tab2)
open(f"{os.environ.get('OUT', '/tmp')}/build_probe.txt", "w").write(tab + "\n" + tab2)
