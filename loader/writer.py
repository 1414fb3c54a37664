"""Writing shards and publishing releases, crash-safe (DESIGN §2).

Every file is written to a temporary name, fsynced and renamed into place, and
`CURRENT` is replaced last: a crash at any point leaves the previous release
whole, and a rerun finds the shards already written (`scan_shards`) and skips
their chunks.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from . import format as fmt
from .store import list_releases, read_current

INDEX_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("doc_id", pa.string()),
        ("chunk_no", pa.int32()),
        ("n_tokens", pa.int32()),
        ("shard", pa.string()),
        ("pos_base", pa.int32()),
        ("neighbours", pa.list_(pa.string())),
        ("checksum", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("text", pa.string()),
    ]
)
assert tuple(INDEX_SCHEMA.names) == fmt.INDEX_COLUMNS


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, rename it to path and fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def init_cache_dir(cache_dir: Path) -> None:
    for sub in (fmt.RELEASES_DIR, fmt.INDEX_DIR, fmt.SHARDS_DIR):
        (cache_dir / sub).mkdir(parents=True, exist_ok=True)


def remove_stale_tmp(cache_dir: Path) -> int:
    """Delete temporary files left by a killed writer. Returns how many."""
    n = 0
    for sub in (fmt.SHARDS_DIR, fmt.INDEX_DIR, fmt.RELEASES_DIR, "."):
        for p in (cache_dir / sub).glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


@contextmanager
def cache_lock(cache_dir: Path):
    """One writer per cache folder at a time (readers never lock)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another build is writing to {cache_dir} (it holds {cache_dir / '.lock'}); "
                "wait for it to finish."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class WrittenChunk:
    chunk_id: str
    shard: str
    checksum: str


@dataclass
class ShardWriter:
    """Buffers chunk tensors and writes them as immutable shards of ~target_bytes."""

    cache_dir: Path
    metadata: dict[str, str]
    target_bytes: int = 1 << 30
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending: list[tuple[str, str]] = field(default_factory=list)  # (chunk_id, checksum)
    _bytes: int = 0
    written: list[WrittenChunk] = field(default_factory=list)

    def add(self, chunk_id: str, kv: torch.Tensor, tokens: torch.Tensor, saliency: torch.Tensor) -> None:
        kv = kv.detach().contiguous().cpu()                         # [L, 2, H_kv, T, D]
        tokens = tokens.detach().to(torch.int32).contiguous().cpu()  # [T]
        saliency = saliency.detach().to(torch.float16).contiguous().cpu()  # [S, T]
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != tokens.shape[0]:
            raise ValueError(f"chunk {chunk_id}: kv must be [L, 2, H_kv, T, D] with T={tokens.shape[0]}, got {tuple(kv.shape)}")
        self._tensors[fmt.kv_name(chunk_id)] = kv
        self._tensors[fmt.tok_name(chunk_id)] = tokens
        self._tensors[fmt.sal_name(chunk_id)] = saliency
        self._pending.append((chunk_id, fmt.checksum(kv, tokens, saliency)))
        self._bytes += kv.numel() * kv.element_size() + tokens.numel() * 4 + saliency.numel() * 2
        if self._bytes >= self.target_bytes:
            self.flush()

    def flush(self) -> list[WrittenChunk]:
        """Write what is buffered as one shard; returns the chunks it holds."""
        if not self._pending:
            return []
        ids = sorted(cid for cid, _ in self._pending)
        shard = "s-" + xxhash.xxh3_64("\n".join(ids).encode()).hexdigest()
        path = self.cache_dir / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}"
        # Same content = same name: a rerun needn't rewrite a shard that is whole, but
        # must replace a torn or corrupt one (scan_shards skipped it, so its chunks
        # were recomputed and are in self._tensors).
        if not _shard_holds(path, self._tensors.keys()):
            write_atomic(path, lambda tmp: save_file(self._tensors, str(tmp), metadata=self.metadata))
        done = [WrittenChunk(cid, shard, ck) for cid, ck in self._pending]
        self.written.extend(done)
        self._tensors, self._pending, self._bytes = {}, [], 0
        return done


def _shard_holds(path: Path, names) -> bool:
    """Whether path is a readable shard holding every tensor in names."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(names) <= set(f.keys())
    except Exception:
        return False


def scan_shards(cache_dir: Path) -> dict[str, str]:
    """chunk_id -> shard for every complete shard on disk (reads headers only).

    Shards that can't be read (a torn write that slipped past the rename, a bad
    disk) are skipped: their chunks are simply recomputed.
    """
    found: dict[str, str] = {}
    folder = cache_dir / fmt.SHARDS_DIR
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob(f"*{fmt.SHARD_SUFFIX}")):
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception:
            continue
        shard = path.name.removesuffix(fmt.SHARD_SUFFIX)
        for key in keys:
            if key.endswith(".kv"):
                found[key.removesuffix(".kv")] = shard
    return found


def next_release_id(cache_dir: Path) -> str:
    existing = [r for r in list_releases(cache_dir) if r.startswith("r") and r[1:5].isdigit()]
    n = max((int(r[1:5]) for r in existing), default=0) + 1
    return f"r{n:04d}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"


def publish_release(cache_dir: Path, rows: list[dict], manifest: dict) -> str:
    """Write the index and manifest of a new release, then point CURRENT at it.

    `rows` are index rows (see INDEX_SCHEMA); `manifest` the release's model,
    params and stats. Returns the new release id. The caller holds cache_lock.
    """
    release = next_release_id(cache_dir)
    index_rel = f"{fmt.INDEX_DIR}/{release}.parquet"
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    write_atomic(cache_dir / index_rel, lambda tmp: pq.write_table(table, tmp))
    manifest = {
        **manifest,
        "release": release,
        "format_version": fmt.FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parent": read_current(cache_dir),
        "index": index_rel,
    }
    write_atomic(
        cache_dir / fmt.RELEASES_DIR / f"{release}.json",
        lambda tmp: tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True)),
    )
    write_atomic(cache_dir / fmt.CURRENT_FILE, lambda tmp: tmp.write_text(release + "\n"))
    return release
