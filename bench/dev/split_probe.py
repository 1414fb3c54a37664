"""Dev probe (issue 11 item 1): the `split` recompute attention against `flex`, per layer.

    python3 bench/dev/split_probe.py --contexts 16384,32768 --out DIR

One Llama-3-8B layer (32 query heads, 8 KV heads, head dim 128, bf16) over a fused cache of
`context` tokens; the query rows are a pass's: `rows` context positions + a 32-token question,
the positions spread uniformly over the context or drawn from its last 40% ("late": what the
bench's random-weight model picks). Times `ScatteredQueries(...).attend` by backend (`flex`,
`sdpa`, `split` at several group sizes) with CUDA events, and checks each against a float32
reference on 256 rows. Writes split_probe.json under --out and prints a table. Not a product path.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from kvfuse.bench.attention import D, H_KV, H_Q, event_times
from kvfuse.runtime import recompute_attention as ra

PREFIX, QUESTION = 32, 32


def problem(context: int, rows: int, late: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lo = int(context * 0.6) if late else 0
    chosen = torch.randperm(context - lo, generator=g)[:rows].sort().values + lo + PREFIX
    n_keys = PREFIX + context + QUESTION
    positions = torch.cat((chosen, torch.arange(PREFIX + context, n_keys)))
    R = positions.numel()
    q = torch.randn(1, R, H_Q, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)   # as q_proj hands it over
    kv = torch.randn(2, 1, H_KV, n_keys + 64, D, device="cuda", dtype=torch.bfloat16)[..., :n_keys, :]
    return positions, n_keys, q, kv[0], kv[1]


def reference(positions, q, k, v, rows=256):
    n_rep = H_Q // H_KV
    mask = torch.arange(k.shape[2], device="cuda")[None] <= positions[:rows, None].cuda()
    return F.scaled_dot_product_attention(q[:, :, :rows].float(), k.float().repeat_interleave(n_rep, 1),
                                          v.float().repeat_interleave(n_rep, 1), attn_mask=mask,
                                          scale=D ** -0.5).transpose(1, 2)              # [1, r, H, D]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="16384,32768")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--groups", default="256,512,1024", help="split variants: rows per group, comma-separated")
    p.add_argument("--rows", default="132,0.05,0.15", help="context rows per pass: counts or shares of the context")
    p.add_argument("--out", type=Path, default=Path("."))
    a = p.parse_args()
    out = []
    for context in [int(c) for c in a.contexts.split(",")]:
        for rows in [round(float(x) * context) if "." in x else int(x) for x in a.rows.split(",")]:
            for late in (False, True):
                positions, n_keys, q, k, v = problem(context, rows, late)
                dev = positions.cuda()
                ref = reference(dev, q, k, v)
                variants = [("flex", None), ("sdpa", None)] + [("split", int(gr)) for gr in a.groups.split(",")]
                for backend, group_rows in variants:
                    if group_rows:
                        ra.SPLIT_GROUP_ROWS = group_rows
                    try:
                        sq = ra.ScatteredQueries(dev, n_keys, backend, host_positions=positions)
                        call = lambda: sq.attend(None, q, k, v, D ** -0.5)  # noqa: E731
                        got = call()
                        err = float((got[:, :256].float() - ref).norm() / ref.norm())
                        for _ in range(3):
                            call()
                        torch.cuda.synchronize()
                        ms = statistics.median(event_times(call, a.reps))
                        row = {"ms": ms, "rel_err": err, "lse_path": ra._lse_path}
                    except Exception as exc:  # noqa: BLE001
                        row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    row.update(context=context, rows=positions.numel(), late=late, backend=backend,
                               group_rows=group_rows)
                    out.append(row)
                    print(json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "split_probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                        "torch": torch.__version__, "rows": out}, indent=1))
    for r in out:
        print(f"{r['context']:>6} {r['rows']:>5} {'late' if r['late'] else 'unif':<4} {r['backend']:<5} "
              f"{str(r['group_rows'] or ''):>12} "
              + (f"{r['ms']:7.3f} ms err {r['rel_err']:.1e}" if "ms" in r
                                                     else r["error"]))


if __name__ == "__main__":
    main()
