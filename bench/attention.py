"""Per-layer attention of the recompute pass, by backend (issue 11 item 1).

    python3 -m kvfuse.bench.attention --contexts 16384,32768 --ratio 0.15 --out bench/results

One Llama-3-8B layer (32 query heads, 8 KV heads, head dim 128, bf16) at each
context length: R = ratio x context scattered queries (sorted random positions)
plus a 32-token question at the end, over prefix + context + question keys. For
every backend of `runtime.recompute_attention` it times, with CUDA events, the
per-pass setup (masks / block mask, built once and shared by all layers) and one
layer's attention (median of `reps`), and checks the output against a float32
reference (‖out − ref‖ / ‖ref‖ over the first 256 rows). Writes attention.json
and attention.md under --out; the fastest correct backend is what the recompute
should use on this GPU (`recompute_attention.CUDA_BACKEND`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from kvfuse.runtime.recompute_attention import BACKENDS, ScatteredQueries

from .timing import environment

H_Q, H_KV, D = 32, 8, 128
PREFIX, QUESTION = 32, 32


class _Module:  # what sdpa_attention_forward reads from an attention module
    num_key_value_groups = H_Q // H_KV
    is_causal = True
    training = False


def event_times(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def scattered_problem(context: int, ratio: float, seed: int = 0, device: str = "cuda"):
    """One layer's recompute attention: (positions [R] ascending, n_keys, q [1, H_Q, R, D],
    k / v [1, H_KV, n_keys, D] bf16): ratio x context random context rows + the question's."""
    gen = torch.Generator().manual_seed(seed)
    n_keys = PREFIX + context + QUESTION
    chosen = torch.randperm(context, generator=gen)[: round(ratio * context)].sort().values + PREFIX
    positions = torch.cat((chosen, torch.arange(PREFIX + context, n_keys))).to(device)     # [R]
    R = positions.numel()
    q = torch.randn(1, H_Q, R, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, H_KV, n_keys, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, H_KV, n_keys, D, device=device, dtype=torch.bfloat16)
    return positions, n_keys, q, k, v


def measure(context: int, ratio: float, reps: int = 20, seed: int = 0, device: str = "cuda") -> dict:
    positions, n_keys, q, k, v = scattered_problem(context, ratio, seed, device)
    R = positions.numel()
    scale = D ** -0.5
    rows = slice(0, 256)
    ref_mask = torch.arange(n_keys, device=device)[None] <= positions[rows, None]            # [r, K]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, rows].float(), k.float().repeat_interleave(H_Q // H_KV, 1),
        v.float().repeat_interleave(H_Q // H_KV, 1), attn_mask=ref_mask, scale=scale).transpose(1, 2)
    out = {"context": context, "ratio": ratio, "rows": R, "keys": n_keys, "backends": {}}
    for name in BACKENDS:
        sq = ScatteredQueries(positions, n_keys, name)
        try:
            first = sq.attend(_Module(), q, k, v, scale)      # builds the masks, compiles (flex)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - report and go on
            out["backends"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        err = float((first[:, rows].float() - ref).norm() / ref.norm())
        setup = event_times(lambda: _setup(sq.backend, positions, n_keys), reps)
        layer = event_times(lambda: sq.attend(_Module(), q, k, v, scale), reps)
        out["backends"][name] = {"backend_used": sq.backend, "layer_ms": statistics.median(layer),
                                 "setup_ms": statistics.median(setup), "rel_err": err,
                                 "pass_ms_32_layers": 32 * statistics.median(layer) + statistics.median(setup)}
    return out


def _setup(backend: str, positions: torch.Tensor, n_keys: int) -> None:
    """The per-pass mask work of `backend` alone."""
    from kvfuse.runtime.recompute_attention import flex_block_mask
    sq = ScatteredQueries(positions, n_keys, backend)
    if backend == "flex":
        flex_block_mask(positions, n_keys)
    elif backend == "sdpa":
        sq.allowed()
    else:
        sq.float_mask(torch.bfloat16)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Recompute attention per layer — {env.get('device')} — {env['date']}", "",
             f"Command: `{result['command']}`  ",
             f"Versions: torch {env['torch']}, transformers {env['transformers']}, CUDA {env.get('cuda')}  ",
             f"One Llama-3-8B layer ({H_Q} query heads, {H_KV} KV heads, head dim {D}, bf16); median of "
             f"{result['reps']} runs; setup = the per-pass masks (built once for all 32 layers).", "",
             "| context | rows | backend | layer ms | setup ms | 32 layers + setup ms | rel. err vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for name, x in row["backends"].items():
            if "error" in x:
                lines.append(f"| {row['context']} | {row['rows']} | {name} | error: {x['error'][:80]} | | | |")
                continue
            used = "" if x["backend_used"] == name else f" (fell back to {x['backend_used']})"
            lines.append(f"| {row['context']} | {row['rows']} | {name}{used} | {x['layer_ms']:.3f} | "
                         f"{x['setup_ms']:.3f} | {x['pass_ms_32_layers']:.1f} | {x['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="16384,32768")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    rows = []
    for c in [int(x) for x in args.contexts.split(",")]:
        rows.append(measure(c, args.ratio, args.reps))
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python3 -m kvfuse.bench.attention " + " ".join(argv or []), "reps": args.reps,
              "environment": environment("cuda"), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(result, indent=1))
    (out / "attention.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
