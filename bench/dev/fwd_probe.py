"""Where does the isolated build's forward time go? (device probe, issue 14)"""
import time, json, os, sys, torch
from kvfuse.bench.shapes import build_random_model
from kvfuse.pipeline import precompute as pc
from kvfuse.runtime.kvcache import kv_from_cache
lm = build_random_model("llama3-8b")
dev = "cuda"
prefix = torch.randint(0, 1000, (32,))
pkv = pc.prefill_prefix(lm, prefix)
T = 512
chunks = [torch.randint(0, 30000, (T,)).tolist() for _ in range(32)]
def timed(name, fn, tokens, reps=2):
    fn(); torch.cuda.synchronize()
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); best = min(best, time.perf_counter() - t0)
    print(f"{name:40s} {tokens / best:9.0f} tok/s  ({best*1000:.1f} ms)", flush=True)
    return tokens / best
res = {}
@torch.inference_mode()
def plain():
    for c in chunks[:16]:
        pc._prefill_after_prefix(lm, pkv, torch.tensor(c))
res["plain_b1_no_record"] = timed("plain b1 (bare decoder after prefix)", plain, 16 * T)
for B in (1, 4, 8, 16):
    def batched(B=B):
        for i in range(0, 16, B):
            pc.prefill_chunks(lm, pkv, chunks[i:i + B], to_cpu=False)
    res[f"prefill_chunks_b{B}"] = timed(f"prefill_chunks B={B} (saliency, kv slices)", batched, 16 * T)
    @torch.inference_mode()
    def fwd_only(B=B):
        for i in range(0, 16, B):
            pc._prefill_after_prefix(lm, pkv, torch.tensor(chunks[i:i + B]))
    res[f"forward_only_b{B}"] = timed(f"forward only B={B}", fwd_only, 16 * T)
    @torch.inference_mode()
    def fwd_rec(B=B):
        for i in range(0, 16, B):
            rec = pc.AttentionRecorder(layers=pc.saliency_layers(lm.spec.n_layers), batched=True)
            pc._prefill_after_prefix(lm, pkv, torch.tensor(chunks[i:i + B]), rec)
    res[f"forward_record_b{B}"] = timed(f"forward + record B={B}", fwd_rec, 16 * T)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    pc.prefill_chunks(lm, pkv, chunks[:4], to_cpu=False); torch.cuda.synchronize()
tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
print(tab)
out = os.environ.get("OUT", "/tmp")
open(f"{out}/fwd_probe.json", "w").write(json.dumps(res, indent=1))
open(f"{out}/fwd_profile.txt", "w").write(tab)
