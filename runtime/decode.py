"""Batched decoding of running requests: one forward per step for all of them.

    batch = DecodeBatch(lm)
    batch.add(row)                   # a prefilled request: its cache, first token, sampling
    tokens = batch.step()            # one forward for every row; [B] next tokens
    batch.remove([row])

Rows have prompts of different lengths. Each layer's K/V of all rows live in one
`[B, H_kv, cap, D]` tensor; row b's valid keys are at 0..len_b-1 (cache index ==
position, as in every kvfuse cache). A step writes each row's new K/V at its own
length (`BatchLayer`) and attends with a `[B, 1, 1, cap]` float mask that hides the
slots past it, so a row never sees another's padding. Decoding reads the weights
once per step whatever B is, so B requests cost about one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .model import LoadedModel, cache_kwargs


class BatchLayer(DynamicLayer):
    """One layer's K/V of every row: `update` writes each row's new token at that row's length."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys[:, :, :1], values[:, :, :1])
        self.keys, self.values, self.lens = keys, values, lens  # [B, H_kv, cap, D] x2, [B] int64

    def update(self, key_states, value_states, *args, **kwargs):
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        self.keys[rows, :, self.lens] = key_states[:, :, 0]       # [B, H_kv, D]
        self.values[rows, :, self.lens] = value_states[:, :, 0]
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return int(self.lens.max()) if self.lens.numel() else 0


@dataclass
class DecodeRow:
    """One running request in the batch."""

    cache: object                   # the request's prefilled cache (layers' keys [1, H_kv, >= n, D])
    n: int                          # prompt length: the first generated token's position
    token: int                      # the last token (sampled from the prefill's logits), next input
    budget: int                     # tokens it may still generate
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    tag: object = None              # the caller's (the engine's request state)
    done: bool = field(default=False)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from logits [V]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p              # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class DecodeBatch:
    """The running requests' caches stacked for batched decode steps."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.rows: list[DecodeRow] = []
        self.keys: list[torch.Tensor] = []    # per layer [B, H_kv, cap, D]
        self.values: list[torch.Tensor] = []
        self.lens = torch.zeros(0, dtype=torch.long, device=lm.model.device)   # [B]

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: DecodeRow) -> None:
        """Stack a prefilled request into the batch (one copy of its prompt's K/V)."""
        layers = row.cache.layers
        device = self.lm.model.device
        need = row.n + row.budget
        cap = max([need] + [int(l) + r.budget for l, r in zip(self.lens.tolist(), self.rows)])
        b = len(self.rows)
        new_keys, new_values = [], []
        for i, layer in enumerate(layers):
            k, v = layer.keys[0, :, : row.n], layer.values[0, :, : row.n]          # [H_kv, n, D]
            shape = (b + 1, k.shape[0], cap, k.shape[-1])
            nk, nv = torch.zeros(shape, dtype=k.dtype, device=device), torch.zeros(shape, dtype=v.dtype, device=device)
            if b:
                old = min(cap, self.keys[i].shape[2])
                nk[:b, :, :old] = self.keys[i][:, :, :old]
                nv[:b, :, :old] = self.values[i][:, :, :old]
            nk[b, :, : row.n] = k
            nv[b, :, : row.n] = v
            new_keys.append(nk)
            new_values.append(nv)
        self.keys, self.values = new_keys, new_values
        self.lens = torch.cat((self.lens, torch.tensor([row.n], device=device)))
        row.cache = None  # the batch holds its K/V now
        self.rows.append(row)

    def remove(self, done: list[DecodeRow]) -> None:
        keep = [i for i, r in enumerate(self.rows) if r not in done]
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.lens.device)
        self.keys = [k.index_select(0, idx) for k in self.keys]
        self.values = [v.index_select(0, idx) for v in self.values]
        self.lens = self.lens.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One forward for every row; returns each row's next token (and advances the rows)."""
        device = self.lm.model.device
        cap = self.keys[0].shape[2]
        cache = DynamicCache()
        cache.layers = [BatchLayer(k, v, self.lens) for k, v in zip(self.keys, self.values)]
        allowed = torch.arange(cap, device=device)[None, :] <= self.lens[:, None]     # [B, cap]
        dtype = self.keys[0].dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        tokens = torch.tensor([[r.token] for r in self.rows], device=device)           # [B, 1]
        out = self.lm.model(input_ids=tokens, position_ids=self.lens[:, None], attention_mask=mask[:, None, None],
                            use_cache=True, logits_to_keep=1, **cache_kwargs(self.lm.model, cache))
        self.lens += 1
        logits = out.logits[:, -1]                                                      # [B, V]
        if all(r.temperature <= 0 for r in self.rows):
            chosen = logits.argmax(-1).tolist()
        else:
            chosen = [sample(logits[b], r.temperature, r.top_p, r.generator) for b, r in enumerate(self.rows)]
        for r, t in zip(self.rows, chosen):
            r.token = t
            r.budget -= 1
        return chosen
