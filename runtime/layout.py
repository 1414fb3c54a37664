"""Where every token of a fused prompt sits (DESIGN §4).

    [shared prefix][chunk_1]...[chunk_k][question]
     0 .. P-1       P ..                 N .. N+Q-1

Cache index == absolute position: chunks are re-rotated to the positions they
take here, so the fused cache is laid out exactly like a full prefill's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FusedLayout:
    prefix_len: int
    chunk_ids: tuple[str, ...]
    chunk_lens: tuple[int, ...]
    question_len: int

    @property
    def chunk_starts(self) -> tuple[int, ...]:
        starts, pos = [], self.prefix_len
        for n in self.chunk_lens:
            starts.append(pos)
            pos += n
        return tuple(starts)

    @property
    def context_len(self) -> int:
        """Tokens of the chunks (the budget is a fraction of these)."""
        return sum(self.chunk_lens)

    @property
    def question_start(self) -> int:
        return self.prefix_len + self.context_len

    @property
    def total_len(self) -> int:
        return self.question_start + self.question_len

    def context_positions(self) -> torch.Tensor:
        return torch.arange(self.prefix_len, self.question_start)  # [C]

    def chunk_index(self) -> torch.Tensor:
        """[C] the chunk number of every context token."""
        return torch.repeat_interleave(torch.arange(len(self.chunk_lens)), torch.tensor(self.chunk_lens))
