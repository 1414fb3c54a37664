"""Dev probe (issue 11): the selection's small passes, per layer: `sdpa` (cuDNN with a boolean
mask) against `pieces` (split-KV: the keys in KEY_PIECES pieces as one batched cuDNN call with
an additive mask, merged by log-sum-exp), and the attention recorder's scores (float32 GEMM
over upcast keys, the old path, against bf16 inputs with a float32-output GEMM and the mask
on the tail columns only).

    python3 bench/dev/smallpass_probe.py --contexts 16384,32768 --out DIR

One Llama-3-8B layer (32 query heads, 8 KV heads, head dim 128, bf16); rows as in
split_probe.py (`rows` context positions + a 32-token question). Writes smallpass_probe.json.
Not a product path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from split_probe import QUESTION, problem, reference  # noqa: E402

from kvfuse.bench.attention import D, event_times  # noqa: E402
from kvfuse.runtime import recompute_attention as ra  # noqa: E402
from kvfuse.runtime.attention import _probabilities  # noqa: E402


def timed(call, reps):
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    return statistics.median(event_times(call, reps))


def old_probabilities(query, key, mask, scaling, rows):
    q = query[:, :, rows]
    b, hq, r, d = q.shape
    grouped = q.float().reshape(b, key.shape[1], hq // key.shape[1] * r, d)
    scores = (grouped @ key.float().transpose(-1, -2)).reshape(b, hq, r, key.shape[2]) * scaling
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).mean(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="16384,32768")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--pieces", default="2,4,8,16")
    p.add_argument("--rows", default="0,132,0.05,0.1")
    p.add_argument("--out", type=Path, default=Path("."))
    a = p.parse_args()
    out = []
    for context in [int(c) for c in a.contexts.split(",")]:
        for rows in [round(float(x) * context) if "." in x else int(x) for x in a.rows.split(",")]:
            for late in (False, True):
                positions, n_keys, q, k, v = problem(context, max(rows, 0), late)
                dev = positions.cuda()
                ref = reference(dev, q, k, v, rows=min(256, positions.numel()))
                variants = [("sdpa", None)] + [("pieces", int(n)) for n in a.pieces.split(",")]
                for backend, pieces in variants:
                    if pieces:
                        ra.KEY_PIECES = pieces
                    try:
                        sq = ra.ScatteredQueries(dev, n_keys, backend, host_positions=positions)
                        call = lambda: sq.attend(None, q, k, v, D ** -0.5)  # noqa: E731
                        got = call()
                        n = ref.shape[1]
                        err = float((got[:, :n].float() - ref).norm() / ref.norm())
                        row = {"ms": timed(call, a.reps), "rel_err": err}
                    except Exception as exc:  # noqa: BLE001
                        row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    row.update(context=context, rows=positions.numel(), late=late, backend=backend, pieces=pieces)
                    out.append(row)
                    print(json.dumps(row), flush=True)
                if rows == 132 and not late:   # the recorder, once per context: the question's rows
                    qrows = slice(-QUESTION, None)
                    sq = ra.ScatteredQueries(dev, n_keys, "sdpa", host_positions=positions)
                    first = sq.first_unseen(qrows)
                    full_mask = sq.row_mask(qrows)
                    tail_mask = sq.row_mask(qrows, first)
                    old = old_probabilities(q, k, full_mask, D ** -0.5, qrows)
                    new = _probabilities(q, k, tail_mask, D ** -0.5, qrows, first)
                    rec = {"context": context, "backend": "recorder",
                           "old_ms": timed(lambda: old_probabilities(q, k, full_mask, D ** -0.5, qrows), a.reps),
                           "new_ms": timed(lambda: _probabilities(q, k, tail_mask, D ** -0.5, qrows, first), a.reps),
                           "max_abs_diff": float((old - new).abs().max()), "max_prob": float(old.max()),
                           "top256_same": bool(torch.equal(old.sum(1)[0].topk(256).indices.sort().values,
                                                           new.sum(1)[0].topk(256).indices.sort().values))}
                    out.append(rec)
                    print(json.dumps(rec), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "smallpass_probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                            "torch": torch.__version__, "rows": out}, indent=1))
    for r in out:
        if r["backend"] == "recorder":
            print(f"{r['context']:>6} recorder old {r['old_ms']:.3f} new {r['new_ms']:.3f} ms diff {r['max_abs_diff']:.1e}"
                  f" same top256 {r['top256_same']}")
            continue
        print(f"{r['context']:>6} {r['rows']:>5} {'late' if r['late'] else 'unif':<4} {r['backend']:<6} "
              f"{str(r['pieces'] or ''):>3} " + (f"{r['ms']:7.3f} ms err {r['rel_err']:.1e}" if "ms" in r else r["error"]))


if __name__ == "__main__":
    main()
