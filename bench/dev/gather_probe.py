"""Dev probe (issue 14): what a warm request's layer-wise gather costs the host and the GPU, by KV dtype.

    python3 bench/dev/gather_probe.py --context 16384 --reps 5 --out DIR

Builds a warm request (a 32-token prefix and context/512 chunks of 512 tokens, Llama-3-8B's
KV geometry: 32 layers, 8 KV heads, head dim 128) as pool entries: each chunk's KV in a
pinned host tensor and a GPU slot, as `Tiers.acquire` hands them over, in bf16 or as fp8
codes with their scales. Then opens `LayerwiseLoad` over them with every layer queued at
once (what a selector that probes every layer does) and times the host's queueing
(`issue_s`) and the GPU until the last layer is gathered and re-rotated, for the product's
gather (one concatenation per run of chunks) and the one it replaced (one copy per chunk
and layer). No model, no store: only the loader's per-request path. Writes gather_probe.json under --out and prints
a table. Not a product path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from kvfuse.loader.pool import PoolEntry
from kvfuse.loader.quant import kv_codec
from kvfuse.runtime.layerwise import LayerwiseLoad

L, H_KV, D, CHUNK, PREFIX, QUESTION = 32, 8, 128, 512, 32, 32


def entries(context: int, kv_dtype: str, device: str):
    """[(GPU slot entry, pinned entry)] for the prefix and every chunk, filled with encoded random KV."""
    codec = kv_codec(kv_dtype)
    pairs = []
    pin = (lambda t: t.cpu().pin_memory()) if device == "cuda" else (lambda t: t.clone())
    lens = [PREFIX] + [CHUNK] * (context // CHUNK)
    # the GPU slots live in one arena (and one scale arena), as the GPU pool holds them
    arena = torch.empty(len(lens), L * 2 * H_KV * CHUNK * D, dtype=codec.storage_dtype(torch.bfloat16), device=device)
    scale_arena = torch.empty(len(lens), L * H_KV * codec.row_width(D, CHUNK), dtype=torch.bfloat16,
                              device=device) if codec.quantised else None
    for i, n in enumerate(lens):
        kv = torch.randn(L, 2, H_KV, n, D, device=device, dtype=torch.bfloat16)
        codes, scales = codec.encode(kv)
        meta = {"tokens": torch.zeros(n, dtype=torch.int32), "saliency": torch.zeros(1, n),
                "pos_base": 0 if i == 0 else PREFIX}
        host = PoolEntry(f"c{i}", i, n, codes.nbytes, pin(codes),
                         None if scales is None else pin(scales), meta=meta)
        gpu = PoolEntry(f"c{i}", i, n, codes.nbytes, arena[i, : codes.numel()].view(codes.shape),
                        None if scales is None else scale_arena[i, : scales.numel()].view(scales.shape), meta=meta)
        pairs.append((gpu, host))
    return codec, pairs, arena, scale_arena


class PerChunkCopies(LayerwiseLoad):
    """The gather before the concatenation per run: one copy per chunk and layer (a dtype
    conversion for codes), the scale rows stacked per layer."""

    def issue(self, upto: int) -> None:
        from kvfuse.loader.quant import dequantize_
        from kvfuse.runtime.rope import rotate_keys_
        for l in range(self.issued, min(upto, self.n_layers)):
            gi = self.group_of[l]
            if gi >= self.copied:
                self._copy_group(gi, *self.groups[gi])
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.h2d_events[gi])
                loaded = [(g, s) for (g, _), s in zip(self.pairs, self.starts) if g.kv is not None]
                torch._foreach_copy_([self.fused[l, :, :, s:s + g.n_tokens] for g, s in loaded],
                                     [g.kv[l] for g, _ in loaded])
                for start, run in self.scale_runs:
                    rows = run[0].scales[l][:, None] if len(run) == 1 else torch.stack([g.scales[l] for g in run], 1)
                    dequantize_(self.fused[l, :, :, start:start + len(run) * run[0].n_tokens], rows, self.key_offsets)
                rotate_keys_(self.fused[l, 0, :, self.context], self.cos, self.sin)
                self.events[l].record(self.stream)
        self.issued = max(self.issued, min(upto, self.n_layers))
        for gi in range(self.copied, len(self.groups)):
            self._copy_group(gi, *self.groups[gi])


class KernelGather(LayerwiseLoad):
    """The gather as one Triton kernel per layer (runtime/gather_kernel.py; opt-in in the product)."""

    def __init__(self, *args, **kwargs):
        from kvfuse.runtime import layerwise
        layerwise.GATHER_KERNEL = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            layerwise.GATHER_KERNEL = False
        assert self.kernel is not None


def one_load(codec, pairs, arena, scale_arena, device: str, cls=LayerwiseLoad) -> dict:
    cuda = device == "cuda"
    tiers = SimpleNamespace(device=torch.device(device), dtype=torch.bfloat16, codec=codec,
                            gpu=SimpleNamespace(slot_shape=(L, 2, H_KV, CHUNK, D), arena=arena,
                                                scale_arena=scale_arena),
                            h2d_stream=torch.cuda.Stream() if cuda else None,
                            copy_stream=torch.cuda.Stream() if cuda else None, release=lambda *a: None)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    load = cls(tiers, "r", pairs, QUESTION, inv_freq, depth=4, measure_stall=cuda, counts={}, first=L)
    host_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.current_stream().wait_event(load.events[-1])
    sync()
    wall_s = time.perf_counter() - t0
    info = load.close()
    return {"open_ms": host_s * 1e3, "issue_ms": load.timings["issue_s"] * 1e3, "wall_ms": wall_s * 1e3,
            "copy_ms": info.get("copy_ms", 0.0), "h2d_ms": info.get("h2d_ms", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", default="model,fp8")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    variants = [(d, name, cls) for d in args.dtypes.split(",")
                for name, cls in (("per-chunk copies", PerChunkCopies), ("cat per run", LayerwiseLoad),
                                  ("triton kernel", KernelGather))]
    if device == "cpu":
        variants = [v for v in variants if v[2] is LayerwiseLoad]
    for kv_dtype, variant, cls in variants:
        codec, pairs, arena, scale_arena = entries(args.context, kv_dtype, device)
        runs = [one_load(codec, pairs, arena, scale_arena, device, cls) for _ in range(args.reps + 1)][1:]   # first: allocator warm-up
        row = {"kv_dtype": kv_dtype, "variant": variant, "context": args.context,
               **{k: statistics.median(r[k] for r in runs) for k in runs[0]}, "runs": runs}
        rows.append(row)
        print(f"{kv_dtype:6s} {variant:17s} open {row['open_ms']:6.1f} ms (issue {row['issue_ms']:6.1f})  wall {row['wall_ms']:6.1f} ms"
              f"  copy {row['copy_ms']:6.1f}  h2d {row['h2d_ms']:6.1f}", flush=True)
        del pairs, arena, scale_arena
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gather_probe.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
