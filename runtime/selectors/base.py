"""What every selector sees, and the small helpers they share.

A selector is a function

    select(ctx: SelectionContext, budget: int) -> LongTensor [S]   # absolute positions, sorted, unique
                                                 | LayerPlan           # a set that narrows with depth

A `LayerPlan` (gradual filtering) recomputes `initial` at the first layers and,
at the layers where `keep` drops, narrows the set inside the recompute pass to
the tokens the question attends to most (the driver measures that attention in
the pass itself: no extra probe). Its budget counts tokens x layers: mean(keep)
== budget, so it costs the recompute FLOPs of a fixed set of `budget` tokens.

`budget` is the number of context tokens to recompute (ratio x context length);
the question is always recomputed, so it is neither counted nor returned.

The expensive signals are computed lazily by the fusion code and cached in the
context, so that several selectors and ratios on one prompt pay for each once:

* `question_attention(selected)` — attention [L, Q, C] of the question tokens to
  the context tokens (mean over heads), from one pass of the question (plus the
  `selected` context tokens, recomputed) over the fused cache;
* `layer_kv(layer)` — K/V [2, H_kv, C, D] of every context token at `layer`,
  recomputed with the full context (the layers above are not run);
* `saliency` — the stored per-token prior [S, C] (`loader.format.SALIENCY_SIGNALS`).

One signal is not shared but belongs to the run: `repair(new)` recomputes the `new`
context tokens with the question over the run's *working* cache, keeps their fresh K/V
there, and returns the question's attention [L, Q, C] after the repair. Tokens repaired
so far (`repaired`) must be among those the selector returns; the final recompute then
runs only the rest (incremental staged selection: the probes' work is not redone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..layout import FusedLayout


@dataclass
class SelectionContext:
    layout: FusedLayout
    kv: torch.Tensor                                       # [L, 2, H_kv, N, D] fused (re-rotated) cache, N = question_start
    attend: Callable[[torch.Tensor], torch.Tensor]         # selected [S] -> question attention [L, Q, C]
    recompute_layer: Callable[[int], torch.Tensor]         # layer -> fresh K/V [2, H_kv, C, D]
    saliency: torch.Tensor | None = None                   # [S_sig, C] offline prior, chunk order
    probe_layers: int | None = None                        # the plain probe reads layers 0..probe_layers-1 (None: all)
    repairer: Callable[..., torch.Tensor] | None = None   # (new [S'], reduce) -> question attention [L, Q, C]
    repaired: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [R] this run's
    repair_s: float = 0.0                                  # seconds this run's repair passes took
    cached: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)              # signal key -> seconds it took to compute
    used: set = field(default_factory=set)                 # signal keys read since the last `used.clear()`

    def _signal(self, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.cached:
            t0 = time.perf_counter()
            self.cached[key] = compute()
            self.costs[key] = time.perf_counter() - t0
        self.used.add(key)
        return self.cached[key]

    def signal_seconds(self) -> float:
        """What the signals read since `used.clear()` cost to compute (whoever paid for them)."""
        return sum(self.costs[k] for k in self.used)

    def question_attention(self, selected: torch.Tensor | None = None) -> torch.Tensor:
        """[L, Q, C]; with `selected`, measured after recomputing those context tokens.

        With `probe_layers` set (a request that runs one selector), the plain probe
        (no `selected`) covers layers 0..probe_layers-1 only: [probe_layers, Q, C]; an
        all-layer probe already made serves it too."""
        selected = torch.zeros(0, dtype=torch.long) if selected is None else selected.long().cpu()
        key = ("attn", tuple(selected.tolist()))
        depth = self.probe_layers if not key[1] else None
        if depth is not None and key not in self.cached:
            key = (*key, depth)
        return self._signal(key, lambda: self.attend(selected).float())

    def repair(self, new: torch.Tensor, keep: bool = True,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """[L, Q, C] question attention after recomputing `new` [S'] (absolute positions, not
        repaired before) into this run's working cache, where they stay fresh for later passes
        and the final recompute. Not cached: each call is a pass. Raises RuntimeError when the
        source has no working cache, ValueError for a position repaired twice.
        keep=False: the final recompute runs `new` again (with the rest), so only the later
        probes gain from this pass; `new` may then be repaired again.
        reduce: a function of the [L, Q, C] attention (e.g. `fused_layer_attention`), run on
        the device of the pass before the result comes to the host; returns its result."""
        if self.repairer is None:
            raise RuntimeError("this fused source has no working cache to repair into (prepare_from wires one)")
        new = new.long().cpu()
        if torch.isin(new, self.repaired).any() or new.unique().numel() != new.numel():
            raise ValueError("repair: a position is repaired twice")
        t0 = time.perf_counter()
        attn = self.repairer(new, reduce).float()         # on the host: the pass has finished
        self.repair_s += time.perf_counter() - t0
        if keep:
            self.repaired = torch.cat((self.repaired, new)).sort().values
        return attn

    def layer_kv(self, layer: int) -> torch.Tensor:
        return self._signal(("layer_kv", layer), lambda: self.recompute_layer(layer))

    def memo(self, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Cache a ratio-independent score vector under `key` (selectors share one context per
        prompt); a cache hit still marks the signals it was computed from as used."""
        if key not in self.cached:
            outer, self.used = self.used, set()
            try:
                self.cached[key] = compute()
                self.cached[("deps", key)] = set(self.used)
            finally:
                self.used = outer | self.used
        self.used |= self.cached[("deps", key)]
        return self.cached[key]


@dataclass
class LayerPlan:
    """A per-layer recompute set, nested: S_0 = `initial`, S_l ⊆ S_{l-1}, |S_l| = keep[l].

    At a layer l where keep[l] < keep[l-1] the recompute pass keeps the keep[l] tokens of
    S_{l-1} the question attended to most over the layers since the previous narrowing
    (at most `window` of them, when given; each layer's attention normalised to sum 1 over
    the candidates, then averaged);
    `pinned` tokens are never dropped. A dropped token reads its stored (re-rotated) KV
    from layer l on. A constant `keep` is the fixed set `initial`, exactly."""
    initial: torch.Tensor                   # [S_0] absolute positions, sorted, unique
    keep: list[int]                         # [L] tokens recomputed at layer l; non-increasing; keep[0] == S_0
    pinned: torch.Tensor | None = None      # [P] positions (a subset of `initial`) kept at every layer
    window: int | None = None               # score over at most this many layers before a narrowing

    def __post_init__(self):
        if not self.keep or self.keep[0] != self.initial.numel():
            raise ValueError(f"LayerPlan: keep[0] must equal len(initial) = {self.initial.numel()}, got "
                             f"{self.keep[:1]}")
        if any(b > a for a, b in zip(self.keep, self.keep[1:])) or self.keep[-1] < 0:
            raise ValueError(f"LayerPlan: keep must be non-increasing and >= 0, got {self.keep}")
        n_pinned = 0 if self.pinned is None else self.pinned.numel()
        if n_pinned > self.keep[-1]:
            raise ValueError(f"LayerPlan: {n_pinned} pinned tokens do not fit the last layer's {self.keep[-1]}")

    @property
    def constant(self) -> bool:
        return self.keep[-1] == self.keep[0]

    @property
    def token_layers(self) -> int:
        """Recompute cost in context tokens x layers (a fixed set of S tokens: S x L)."""
        return sum(self.keep)


def layer_schedule(levels: list[tuple[float, float]], n_layers: int, budget: int, n_context: int) -> list[int]:
    """Tokens to recompute per layer [L] at equal FLOPs: sum == n_layers x budget, non-increasing,
    each <= n_context. `levels` [(first layer as a fraction of L, tokens as a multiple of the
    budget)], fractions ascending from 0, multiples non-increasing: e.g. [(0, 2), (0.5, 0.5)] runs
    2x the budget through the first half of the layers and half of it through the rest; the
    multiples are then scaled so the total matches exactly."""
    budget = clamp_budget(budget, n_context)
    target = n_layers * budget
    if target == 0:
        return [0] * n_layers
    shape = []
    for l in range(n_layers):
        mult = [m for f, m in levels if f * n_layers <= l + 1e-9]
        shape.append(mult[-1] if mult else levels[0][1])
    lo, hi = 0.0, float(n_context) / max(min(shape), 1e-9) + 1.0    # scale s: sum(min(C, s * shape * B)) == target
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(min(n_context, mid * m * budget) for m in shape) < target:
            lo = mid
        else:
            hi = mid
    keep = [min(n_context, int(lo * m * budget)) for m in shape]
    residual = target - sum(keep)            # < one token per unclamped layer (the floors)
    first = next((i for i in range(n_layers) if keep[i] < n_context), n_layers)
    for l in range(first, first + residual):  # one each to the first unclamped layers: stays non-increasing
        keep[l] += 1
    return keep


def clamp_budget(budget: int, n: int) -> int:
    return max(0, min(int(budget), n))


def top_positions(scores: torch.Tensor, budget: int, layout: FusedLayout) -> torch.Tensor:
    """The `budget` highest-scoring context tokens ([C] scores), as sorted absolute positions.

    Ties break towards the earlier token (stable sort), so results are deterministic.
    """
    budget = clamp_budget(budget, scores.numel())
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:budget]
    return order.sort().values + layout.prefix_len


def fused_layer_attention(attn: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
    """[L, Q, C] -> [C]: question attention summed over question tokens, each layer
    normalised to sum 1 over the context (so no layer dominates), averaged over `layers`."""
    per_layer = attn[layers].sum(1)                                  # [L', C]
    per_layer = per_layer / per_layer.sum(-1, keepdim=True).clamp_min(1e-12)
    return per_layer.mean(0)


def empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)
