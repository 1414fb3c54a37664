"""Load a cold chunk's KV or recompute it? A cost model per request (issue 11 item 3).

    rates = LoadRates(disk_gbps=2.0, h2d_gbps=50.0, prefill_tok_s=28000.0)   # or learnt: observe_*()
    plan = plan_cold(chunks, rates, n_prefix, n_question, fused_tokens)      # chunks: [ChunkLoad]
    plan.front                         # the first `front` chunks are prefilled from their tokens, the rest loaded
    plan.as_dict()                     # choices, estimates and rates, for the answer's timings

A chunk in neither pool must come from disk before the layer-wise pass can use it
(`Tiers.acquire` waits for its read); its K/V can be computed instead. The recompute
of a chunk needs the K/V of every chunk before it at every layer, so a chunk at the
back can only be computed once the front has arrived: nothing would overlap the disk
(reads are chunk-major). A chunk at the *front* needs nothing: the plan prefills the
prefix and the first k chunks from their tokens (a plain causal prefill, exact K/V) on
the GPU while the other chunks are read from disk, then runs the fused pass over those
with the front as its prefix. The prefetch reads a request's chunks from the back for
this (`Prefetcher.submit`). For k = 0 .. n it costs (seconds):

    k = 0      disk(all) + max(h2d(all), fused(C))                    # load everything (no plan)
    0 < k < n  max(prefill(P + front), disk(back)) + max(h2d(back), fused(C))
    k = n      prefill(P + C + Q)                                      # the full prefill, nothing read

    disk(x)    = bytes of x's cold chunks (+ READ_LEFT x those being read) / disk rate
    h2d(x)     = bytes of x's chunks not in the GPU pool / pinned -> GPU rate
    prefill(n) = n / prefill tokens per second
    fused(C)   = fused_tokens(C) / the same rate x fused_scale (learnt: what fused passes really took);
                 the whole context's C also behind a prefilled front (see estimate_s)

and keeps the cheapest (the fewest recomputed on a tie: loaded chunks stay pooled for
later requests). A chunk being read ("reading") and recomputed finishes its read in the
background and is pinned for later requests. The rates are measured: `LoadRates.observe_*`
keeps a moving average of what requests saw (the tiered source feeds it after every
request, warm and hot ones too: they teach fused_scale), and a benchmark sets them from
its own measurements. Without fused_scale the plan took the fused pass for a plain
prefill of its tokens: on an H200 at 16k it planned 419 ms for prefilling 21 chunks and
fusing the other 11, which took 611 ms, slower than the 585 ms full prefill it could have
chosen (the fused pass after the front took ~190 ms, not the ~35 ms its tokens say). Pure arithmetic: no
torch, no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

STATES = ("hot", "warm", "reading", "cold")
# Share of a running read still to come. The reads in flight share the disk and a request usually
# plans right after its submit started them, so count them whole (1.0): erring towards waiting less.
READ_LEFT = 1.0


@dataclass
class LoadRates:
    """Measured rates the plan weighs. disk_gbps: shard file -> pinned pool, all reader threads
    together (GB/s, 1e9 bytes); h2d_gbps: pinned -> GPU; prefill_tok_s: tokens per second that a
    prefill (or the recompute) runs through the model at the request's context length."""

    disk_gbps: float = 2.0
    h2d_gbps: float = 25.0
    prefill_tok_s: float = 20000.0
    fused_scale: float = 1.0    # measured fused pass (selection + recompute) / its token-count estimate
    alpha: float = 0.5          # weight of a new observation in the moving averages

    def observe_disk(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.disk_gbps = self._mix(self.disk_gbps, nbytes / seconds / 1e9)

    def observe_h2d(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.h2d_gbps = self._mix(self.h2d_gbps, nbytes / seconds / 1e9)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tok_s = self._mix(self.prefill_tok_s, tokens / seconds)

    def observe_fused(self, estimated_s: float, seconds: float) -> None:
        """A fused pass took `seconds` where the token count (at prefill_tok_s) said estimated_s:
        its probes, selection, scattered attention and per-layer overheads run slower per token
        than a plain prefill does, by a factor that depends on the machine and the selector."""
        if estimated_s > 0 and seconds > 0:
            self.fused_scale = self._mix(self.fused_scale, seconds / estimated_s)

    def _mix(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    def as_dict(self) -> dict:
        return {"disk_gbps": self.disk_gbps, "h2d_gbps": self.h2d_gbps, "prefill_tok_s": self.prefill_tok_s,
                "fused_scale": self.fused_scale}


@dataclass(frozen=True)
class ChunkLoad:
    state: str       # one of STATES
    n_tokens: int
    nbytes: int      # its KV bytes (all layers)


@dataclass
class ColdPlan:
    choices: list[str]           # per chunk: "recompute" (the first `front`) or "load"
    est_s: float                 # the chosen plan's estimated time (s)
    load_all_s: float            # estimate when every chunk is loaded (the behaviour without a plan)
    recompute_all_s: float       # estimate of the full prefill (every chunk recomputed)
    rates: dict
    disk_bytes: int = 0          # bytes the chosen plan waits for from disk (chunks loaded that are cold or reading)

    @property
    def front(self) -> int:
        """Chunks recomputed: the first `front` of the prompt."""
        return self.choices.count("recompute")

    @property
    def recompute(self) -> list[int]:
        return list(range(self.front))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["recomputed"] = self.front
        return d


# A plan that reads anything from disk must be estimated below this share of the full prefill's
# estimate. The full prefill's rate is measured; a split also rests on the disk rate, the fused
# pass's learnt scale and the contention between them, and ran 10-13% over its estimate on the H200
# (Llama-3-8B 32k: 1.57 s for 1.385 estimated; Qwen2.5-7B 16k: 551 ms for 499), so a plan that wins
# by less than that is a coin toss against a certain cost.
FULL_PREFILL_MARGIN = 0.9


def _disk_h2d(chunks: Sequence[ChunkLoad]) -> tuple[float, float]:
    """(bytes to wait for from disk, bytes to copy pinned -> GPU) of loading `chunks`."""
    disk = sum(c.nbytes * (1.0 if c.state == "cold" else READ_LEFT) for c in chunks if c.state in ("cold", "reading"))
    return disk, sum(c.nbytes for c in chunks if c.state != "hot")


def estimate_s(chunks: Sequence[ChunkLoad], front: int, rates: LoadRates, n_prefix: int, n_question: int,
               fused_tokens: Callable[[int], float]) -> float:
    """Seconds to the first token when the prefix and the first `front` chunks are prefilled
    from their tokens while the rest load, then fused (the model in the module doc)."""
    tok_s, disk_bps, h2d_bps = rates.prefill_tok_s, rates.disk_gbps * 1e9, rates.h2d_gbps * 1e9
    n_front = sum(c.n_tokens for c in chunks[:front])
    if front == len(chunks):
        return (n_prefix + n_front + n_question) / tok_s                 # the full prefill
    back = chunks[front:]
    disk, h2d = _disk_h2d(back)
    first = (n_prefix + n_front) / tok_s if front else 0.0              # overlaps the disk reads of the back
    # the pass over the back costs about what a pass over the whole context does: its probes and
    # selection run behind the front as their prefix (H200, 16k: 0.54 s for a 4.6k-token back
    # behind an 11.8k-token front, 0.42 s with every chunk loaded), so it is charged for all of it
    fused = fused_tokens(sum(c.n_tokens for c in chunks)) / tok_s * rates.fused_scale
    return max(first, disk / disk_bps) + max(h2d / h2d_bps, fused)


def plan_cold(chunks: Sequence[ChunkLoad], rates: LoadRates, n_prefix: int, n_question: int,
              fused_tokens: Callable[[int], float] | float) -> ColdPlan:
    """How many chunks, from the front, to prefill from their tokens instead of loading (module doc).

    chunks: the request's context chunks in prompt order (not the prefix); fused_tokens(C): the
    tokens the fused pass runs over C context tokens (probes, selected, question:
    `guards.fused_tokens`), or a constant. Raises ValueError for an unknown state or a rate <= 0."""
    for c in chunks:
        if c.state not in STATES:
            raise ValueError(f"unknown chunk state {c.state!r}; one of {', '.join(STATES)}")
    if not min(rates.disk_gbps, rates.h2d_gbps, rates.prefill_tok_s) > 0:
        raise ValueError(f"rates must be > 0, got {rates.as_dict()}")
    fused = fused_tokens if callable(fused_tokens) else (lambda n, c=float(fused_tokens): c)
    costs = [estimate_s(chunks, k, rates, n_prefix, n_question, fused) for k in range(len(chunks) + 1)]
    best = min(range(len(costs)), key=lambda k: (costs[k], k))     # the fewest recomputed on a tie
    if costs[best] > FULL_PREFILL_MARGIN * costs[-1]:               # not clearly better: the sure thing
        best = len(chunks)
    return ColdPlan(choices=["recompute"] * best + ["load"] * (len(chunks) - best), est_s=costs[best],
                    load_all_s=costs[0], recompute_all_s=costs[-1], rates=rates.as_dict(),
                    disk_bytes=int(_disk_h2d(chunks[best:])[0]))


def cold_plan_notes(timings: dict) -> list[str]:
    """What a request's cold-load plan (timings["cold_plan"], if any) changed, for its answer's notes."""
    plan = timings.get("cold_plan")
    if not plan or not plan["recomputed"]:
        return []
    return [f"cold load: recomputed {plan['recomputed']} of the {len(plan['choices'])} chunks instead of reading "
            f"them from disk (estimated {1e3 * plan['est_s']:.0f} ms against {1e3 * plan['load_all_s']:.0f} ms "
            f"loading every chunk, at {plan['rates']['disk_gbps']:.1f} GB/s from disk and "
            f"{plan['rates']['prefill_tok_s']:.0f} prefill tokens/s)"]
