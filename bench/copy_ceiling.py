"""The loader's host->GPU copies against the pinned ceiling, by copy design (issue 11 item 4).

    python3 -m kvfuse.bench.copy_ceiling --shapes llama3-8b,qwen2.5-7b --contexts 16384,32768 --out DIR

For each model shape's KV geometry (no model is built: only its pools) and context, a
request of `context / chunk_tokens` chunks is copied from pinned host slots (in shuffled
slot order, as a pool has after evictions) into GPU slots, every way we considered:

* `ceiling`:   one copy of the same bytes, pinned -> GPU (what the hardware gives);
* `per_layer`: one copy per chunk and layer, layer by layer (the loader before issue 11);
* `grouped`:   one copy per chunk and *layer group* (`layerwise.layer_groups`: 1, 1, 2, 4, 8, ...
               layers; a chunk's layers are adjacent in its slot): what the loader does now;
* `whole`:     one copy per chunk, all layers (no layer-wise overlap; the upper bound of the layout);
* `staged`:    per layer, a CPU copy of every chunk's layer into one pinned staging buffer
               (torch's threaded CPU copy), then one host->GPU copy per layer;
* `loader`:    `LayerwiseLoad` itself over those pools (copies + gather + re-rotation, h2d time
               from its events): the number `kvfuse bench ttft` reports as "loader GB/s".

GB/s are bytes / GPU time between events on the copy stream (the host's issuing cost shows
when the copies are issued slower than the copy engine drains them); `issue_ms` is the host's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvfuse.loader.pool import KVPool
from kvfuse.loader.quant import kv_codec
from kvfuse.runtime.layerwise import LayerwiseLoad, layer_groups

from .shapes import SHAPES
from .timing import environment, host_to_gpu_gbps, median

MODES = ("ceiling", "per_layer", "grouped", "whole", "staged", "loader")


def geometry(shape: str) -> tuple[int, int, int]:
    s = SHAPES[shape]
    return s["num_hidden_layers"], s["num_key_value_heads"], s.get("head_dim", s["hidden_size"] // s["num_attention_heads"])


class _StubTiers:
    """What `LayerwiseLoad` reads of `loader.tiers.Tiers`: pools, streams, the model dtype and the
    codec (model-dtype KV: the pools hold what the gather writes), release."""

    def __init__(self, host: KVPool, gpu: KVPool, device):
        self.host, self.gpu, self.device = host, gpu, torch.device(device)
        self.dtype, self.codec = gpu.dtype, kv_codec("model")
        cuda = self.device.type == "cuda"
        self.h2d_stream = torch.cuda.Stream(self.device) if cuda else None
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None

    def release(self, request_id, pairs):
        pass


def make_request(shape: str, context: int, chunk_tokens: int, device, seed: int = 0):
    """(stub tiers, pairs [(GPU entry, pinned entry)], bytes): a request's chunks, pinned, in shuffled slots."""
    L, H, D = geometry(shape)
    n = context // chunk_tokens
    slot = (L, 2, H, chunk_tokens, D)
    slot_bytes = L * 2 * H * chunk_tokens * D * 2
    cuda = torch.device(device).type == "cuda"
    host = KVPool("pinned host", (n + 2) * slot_bytes, slot, torch.bfloat16, "cpu", pin=cuda)
    gpu = KVPool("GPU", (n + 2) * slot_bytes, slot, torch.bfloat16, device)
    host.arena.zero_()   # values don't matter to a copy's speed; touched, so no page faults later
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n + 2, generator=gen).tolist()
    host._free = order[:]          # shuffled host slots: no two neighbours need be adjacent
    pairs = []
    for i in range(n):
        h = host.allocate(f"c{i}", chunk_tokens)
        g = gpu.allocate(f"c{i}", chunk_tokens)
        meta = {"tokens": torch.zeros(chunk_tokens, dtype=torch.int32), "pos_base": 0,
                "saliency": torch.zeros(1, chunk_tokens, dtype=torch.float16)}
        h.meta = g.meta = meta
        pairs.append((g, h))
    return _StubTiers(host, gpu, device), pairs, n * slot_bytes


def _copies(mode: str, pairs, staging=None, gstaging=None, done=None):
    """Issue `mode`'s copies on the current stream."""
    L = pairs[0][0].kv.shape[0]
    if mode == "per_layer":
        for l in range(L):
            torch._foreach_copy_([g.kv[l] for g, _ in pairs], [h.kv[l] for _, h in pairs], non_blocking=True)
    elif mode == "grouped":
        for a, b in layer_groups(L):
            torch._foreach_copy_([g.kv[a:b] for g, _ in pairs], [h.kv[a:b] for _, h in pairs], non_blocking=True)
    elif mode == "whole":
        torch._foreach_copy_([g.kv for g, _ in pairs], [h.kv for _, h in pairs], non_blocking=True)
    elif mode == "staged":
        for l in range(L):
            done[l % 2].synchronize()       # this half's previous host -> GPU copy has finished
            torch.stack([h.kv[l] for _, h in pairs], out=staging[l % 2])   # CPU copy into pinned staging
            gstaging[l % 2].copy_(staging[l % 2], non_blocking=True)
            done[l % 2].record()
    else:
        raise ValueError(mode)


def time_mode(mode: str, tiers, pairs, nbytes: int, reps: int) -> dict:
    device = tiers.device
    stream = tiers.h2d_stream
    staging = gstaging = None
    if mode == "staged":
        shape = (len(pairs), *pairs[0][1].kv.shape[1:])
        staging = [torch.zeros(shape, dtype=torch.bfloat16, pin_memory=True) for _ in range(2)]
        gstaging = [torch.empty(shape, dtype=torch.bfloat16, device=device) for _ in range(2)]
    if mode == "ceiling":
        src = tiers.host.arena[: len(pairs)]
        dst = tiers.gpu.arena[: len(pairs)]
    gpu_ms, issue_ms = [], []
    for rep in range(reps + 1):
        torch.cuda.synchronize(device)
        if mode == "loader":
            t0 = time.perf_counter()
            load = LayerwiseLoad(tiers, "bench", [(pairs[0][0], pairs[0][1]), *pairs[1:]], 32,
                                 torch.ones(pairs[0][0].kv.shape[-1] // 2, device=device), depth=0,
                                 measure_stall=True, counts={"warm": len(pairs)}, first=1)
            load.issue_all()
            issue = (time.perf_counter() - t0) * 1e3
            info = load.close()
            ms = info["h2d_ms"]
        else:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                a.record(stream)
                t0 = time.perf_counter()
                if mode == "ceiling":
                    dst.copy_(src, non_blocking=True)
                else:
                    _copies(mode, pairs, staging, gstaging, [torch.cuda.Event(), torch.cuda.Event()])
                issue = (time.perf_counter() - t0) * 1e3
                b.record(stream)
            b.synchronize()
            ms = a.elapsed_time(b)
        if rep:
            gpu_ms.append(ms)
            issue_ms.append(issue)
    ms = median(gpu_ms)
    return {"gbps": nbytes / (ms * 1e-3) / 1e9, "ms": ms, "issue_ms": median(issue_ms)}


def run(shapes, contexts, chunk_tokens: int = 512, reps: int = 5, device: str = "cuda", modes=MODES) -> dict:
    out = {"environment": environment(device), "ceiling_1gib": host_to_gpu_gbps(device=device), "rows": []}
    for shape in shapes:
        for ctx in contexts:
            tiers, pairs, nbytes = make_request(shape, ctx, chunk_tokens, device)
            L, H, D = geometry(shape)
            row = {"shape": shape, "context": ctx, "bytes": nbytes, "chunks": len(pairs),
                   "chunk_layer_mib": 2 * H * chunk_tokens * D * 2 / 2**20}
            for mode in modes:
                row[mode] = time_mode(mode, tiers, pairs, nbytes, reps)
            ceil = row["ceiling"]["gbps"]
            for mode in modes:
                row[mode]["fraction"] = row[mode]["gbps"] / ceil
            out["rows"].append(row)
            print(f"{shape:>11} {ctx:>6}: " + "  ".join(
                f"{m} {row[m]['gbps']:.1f} GB/s ({100 * row[m]['fraction']:.0f}%, issue {row[m]['issue_ms']:.1f} ms)"
                for m in modes), flush=True)
            del tiers, pairs
            torch.cuda.empty_cache()
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    modes = [m for m in MODES if m in result["rows"][0]]
    lines = [f"# Loader copies against the pinned ceiling — {env.get('device')} — {env['date']}", "",
             f"torch {env['torch']}; pinned 1 GiB copy: {result['ceiling_1gib']['pinned_gbps']:.1f} GB/s. "
             "GB/s (share of one copy of the same bytes); host issue time in ms.", "",
             "| shape | context | MiB per chunk-layer | " + " | ".join(modes) + " |",
             "|---|---|---|" + "---|" * len(modes)]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['context']} | {r['chunk_layer_mib']:.0f} | " + " | ".join(
            f"{r[m]['gbps']:.1f} ({100 * r[m]['fraction']:.0f}%, {r[m]['issue_ms']:.1f} ms)" for m in modes) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama3-8b,qwen2.5-7b")
    p.add_argument("--contexts", default="16384,32768")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    result = run(a.shapes.split(","), [int(x) for x in a.contexts.split(",")], a.chunk_tokens, a.reps,
                 modes=tuple(a.modes.split(",")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "copy_ceiling.json").write_text(json.dumps(result, indent=1))
    (out / "copy_ceiling.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
