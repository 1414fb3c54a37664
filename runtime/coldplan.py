"""Load a cold chunk's KV or recompute it? A cost model per request (issue 11 item 3).

    rates = LoadRates(disk_gbps=2.0, h2d_gbps=50.0, prefill_tok_s=28000.0)   # or learnt: observe_*()
    plan = plan_cold(chunks, rates, base_tokens=fused_tokens(...))            # chunks: [ChunkLoad]
    plan.recompute                     # indices of the chunks whose tokens are recomputed instead
    plan.as_dict()                     # choices, estimates and rates, for the answer's timings

A chunk in neither pool must come from disk before the layer-wise pass can use it
(`Tiers.acquire` waits for its read), while the recompute could produce its K/V
instead: its tokens join the recompute set at every layer (the driver's existing
recompute; at the limit every chunk recomputed is a full prefill). The plan loads
from the front and recomputes from the back: for k = 0 .. (chunks not pinned) it costs
recomputing the last k of them and loading the rest, and keeps the cheapest
(the fewest recomputed on a tie: a loaded chunk stays pinned for later requests).

Cost of a choice, in seconds (what the layer-wise pass overlaps and what it doesn't):

    disk    = (bytes of the cold chunks loaded + READ_LEFT x bytes of reads already running) / disk rate
    h2d     = bytes of every chunk not in the GPU pool that is loaded / pinned->GPU rate
    compute = (base_tokens + tokens of the recomputed chunks) / prefill tokens per second
    total   = disk + max(h2d, compute)       # reads finish before the pass; copies overlap compute

Chunks in the GPU pool ("hot") or pinned ("warm") are always loaded. A chunk whose read
is running ("reading", e.g. the prefetch started it when the request was queued) may be
recomputed too: its read finishes in the background and pins it for later requests. The rates are measured: `LoadRates.observe_*` keeps a moving average of what
requests saw (the tiered source feeds it after every request), and a benchmark can set
them from its own measurements. Pure arithmetic: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

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

    def _mix(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    def as_dict(self) -> dict:
        return {"disk_gbps": self.disk_gbps, "h2d_gbps": self.h2d_gbps, "prefill_tok_s": self.prefill_tok_s}


@dataclass(frozen=True)
class ChunkLoad:
    state: str       # one of STATES
    n_tokens: int
    nbytes: int      # its KV bytes (all layers)


@dataclass
class ColdPlan:
    choices: list[str]           # per chunk: "load" or "recompute"
    est_s: float                 # the chosen plan's estimated time (s)
    load_all_s: float            # estimate when every chunk is loaded (today's behaviour)
    recompute_all_s: float       # estimate when every chunk not pinned is recomputed
    rates: dict
    disk_bytes: int = 0          # bytes the chosen plan waits for from disk (cold chunks loaded, reads running)

    @property
    def recompute(self) -> list[int]:
        return [i for i, c in enumerate(self.choices) if c == "recompute"]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["recomputed"] = len(self.recompute)
        return d


def estimate_s(chunks: Sequence[ChunkLoad], recompute: set[int], rates: LoadRates, base_tokens: float) -> float:
    """Seconds the fused pass takes (the model above) when the chunks at `recompute` are recomputed."""
    disk = h2d = 0.0
    tokens = float(base_tokens)
    for i, c in enumerate(chunks):
        if i in recompute:
            tokens += c.n_tokens
            continue
        if c.state == "cold":
            disk += c.nbytes
        elif c.state == "reading":
            disk += READ_LEFT * c.nbytes
        if c.state != "hot":
            h2d += c.nbytes
    return disk / (rates.disk_gbps * 1e9) + max(h2d / (rates.h2d_gbps * 1e9), tokens / rates.prefill_tok_s)


def plan_cold(chunks: Sequence[ChunkLoad], rates: LoadRates, base_tokens: float) -> ColdPlan:
    """Which cold chunks to recompute instead of loading (see the module doc).

    chunks: the request's context chunks in prompt order (not the prefix); base_tokens: the
    tokens the fused pass runs anyway (probes, selected, question: `guards.fused_tokens`).
    Raises ValueError for an unknown state or a rate <= 0."""
    for c in chunks:
        if c.state not in STATES:
            raise ValueError(f"unknown chunk state {c.state!r}; one of {', '.join(STATES)}")
    if min(rates.disk_gbps, rates.h2d_gbps, rates.prefill_tok_s) <= 0:
        raise ValueError(f"rates must be > 0, got {rates.as_dict()}")
    cold = [i for i, c in enumerate(chunks) if c.state in ("reading", "cold")]
    best_k, best = 0, None
    costs = []
    for k in range(len(cold) + 1):              # recompute the last k cold chunks
        t = estimate_s(chunks, set(cold[len(cold) - k:]), rates, base_tokens)
        costs.append(t)
        if best is None or t < best:
            best_k, best = k, t
    chosen = set(cold[len(cold) - best_k:])
    disk = sum(chunks[i].nbytes for i in cold if i not in chosen)
    return ColdPlan(choices=["recompute" if i in chosen else "load" for i in range(len(chunks))], est_s=costs[best_k],
                    load_all_s=costs[0], recompute_all_s=costs[-1], rates=rates.as_dict(), disk_bytes=disk)


def cold_plan_notes(timings: dict) -> list[str]:
    """What a request's cold-load plan (timings["cold_plan"], if any) changed, for its answer's notes."""
    plan = timings.get("cold_plan")
    if not plan or not plan["recomputed"]:
        return []
    return [f"cold load: recomputed {plan['recomputed']} of the {len(plan['choices'])} chunks instead of reading "
            f"them from disk (estimated {1e3 * plan['est_s']:.0f} ms against {1e3 * plan['load_all_s']:.0f} ms "
            f"loading every chunk, at {plan['rates']['disk_gbps']:.1f} GB/s from disk and "
            f"{plan['rates']['prefill_tok_s']:.0f} prefill tokens/s)"]
