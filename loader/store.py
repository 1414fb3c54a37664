"""Reading a release of the chunk KV store (DESIGN §2).

    store = Store.open("cache/")            # pins the release CURRENT names now
    store.check_model(spec.fingerprint, "float32")
    chunk = store.read(chunk_id)            # ChunkData: kv [L, 2, H_kv, T, D], tokens [T], saliency [S, T]

Shards are memory-mapped through `safetensors.safe_open`; a reader keeps the
release it opened even while a newer one is published (shards are immutable and
only `kvfuse gc` deletes them, never those of a kept release).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from . import format as fmt
from .errors import (
    CorruptShardError,
    ModelMismatchError,
    NoReleaseError,
    StoreError,
    UnknownChunkError,
    UnsafePathError,
)


@dataclass(frozen=True)
class ChunkRecord:
    """One index row."""

    chunk_id: str
    doc_id: str
    chunk_no: int
    n_tokens: int
    shard: str
    pos_base: int
    neighbours: tuple[str, ...]
    checksum: str
    char_start: int
    char_end: int
    text: str


@dataclass
class ChunkData:
    chunk_id: str
    kv: torch.Tensor        # [L, 2, H_kv, T, D] model dtype, keys rotated at pos_base..pos_base+T-1
    tokens: torch.Tensor    # [T] int32
    saliency: torch.Tensor  # [S, T] float16
    pos_base: int


def read_current(cache_dir: Path) -> str | None:
    path = Path(cache_dir) / fmt.CURRENT_FILE
    if not path.exists():
        return None
    release = path.read_text().strip()
    return release or None


def list_releases(cache_dir: Path) -> list[str]:
    folder = Path(cache_dir) / fmt.RELEASES_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json"))


def _inside(cache_dir: Path, relpath: str, what: str) -> Path:
    """Resolve a path named by a manifest, refusing anything outside the cache folder."""
    root = cache_dir.resolve()
    path = (root / relpath).resolve()
    if not path.is_relative_to(root):
        raise UnsafePathError(
            f"{what} points outside the cache folder {root}: {relpath!r}. "
            "The manifest was edited or written by something else; refusing to read it."
        )
    return path


class Store:
    """A read-only view of one release."""

    def __init__(self, cache_dir: Path, manifest: dict, records: dict[str, ChunkRecord]):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.release: str = manifest["release"]
        self._records = records
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()

    # ---- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, cache_dir: str | Path, release: str | None = None) -> "Store":
        cache_dir = Path(cache_dir)
        if not cache_dir.is_dir():
            raise NoReleaseError(f"no cache folder at {cache_dir}; build one with `kvfuse build-cache`.")
        release = release or read_current(cache_dir)
        if release is None:
            raise NoReleaseError(
                f"{cache_dir} has no current release (no {fmt.CURRENT_FILE} file); "
                "build one with `kvfuse build-cache CORPUS --cache DIR`."
            )
        if not fmt.is_safe_name(release):
            raise UnsafePathError(f"release name {release!r} is not a plain file name; refusing it.")
        manifest_path = cache_dir / fmt.RELEASES_DIR / f"{release}.json"
        if not manifest_path.exists():
            known = ", ".join(list_releases(cache_dir)) or "none"
            raise NoReleaseError(f"unknown release {release!r} in {cache_dir} (releases: {known}).")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"release manifest {manifest_path} is not valid JSON: {e}") from e
        version = manifest.get("format_version")
        if version != fmt.FORMAT_VERSION:
            raise StoreError(
                f"release {release} has store format {version}; this kvfuse reads format "
                f"{fmt.FORMAT_VERSION}. Rebuild the cache with this version."
            )
        index_path = _inside(cache_dir, manifest["index"], f"release {release}'s index")
        if not index_path.exists():
            raise StoreError(f"release {release}'s index {index_path} is missing; the cache is damaged.")
        records = _read_index(index_path)
        for rec in records.values():
            if not fmt.is_safe_name(rec.shard):
                raise UnsafePathError(
                    f"index row {rec.chunk_id} names shard {rec.shard!r}, which is not a plain file "
                    "name inside the cache folder; refusing it."
                )
        return cls(cache_dir, manifest, records)

    # ---- metadata ------------------------------------------------------------------
    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def prefix_id(self) -> str:
        return self.manifest["prefix"]["chunk_id"]

    def check_model(self, fingerprint: str, dtype: str | torch.dtype) -> None:
        """Refuse to serve this cache to a model (or dtype) it was not built with."""
        want_dtype = dtype if isinstance(dtype, str) else fmt.dtype_name(dtype)
        have = self.model
        if have["fingerprint"] != fingerprint:
            raise ModelMismatchError(
                f"cache {self.cache_dir} (release {self.release}) was built with model "
                f"{have.get('name')} fingerprint {have['fingerprint']}, but the model given has "
                f"fingerprint {fingerprint}. Use the same model, or rebuild the cache for this one."
            )
        if have["dtype"] != want_dtype:
            raise ModelMismatchError(
                f"cache {self.cache_dir} holds {have['dtype']} KV but the model runs in {want_dtype}; "
                f"load the model with dtype={have['dtype']} or rebuild the cache."
            )

    def records(self, include_prefix: bool = False) -> list[ChunkRecord]:
        rows = self._records.values()
        if not include_prefix:
            rows = [r for r in rows if r.doc_id != fmt.PREFIX_DOC_ID]
        return sorted(rows, key=lambda r: (r.doc_id, r.chunk_no))

    def record(self, chunk_id: str) -> ChunkRecord:
        try:
            return self._records[chunk_id]
        except KeyError:
            raise UnknownChunkError(
                f"unknown chunk id {chunk_id!r} in release {self.release} of {self.cache_dir}"
            ) from None

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def shard_path(self, shard: str) -> Path:
        return _inside(self.cache_dir, f"{fmt.SHARDS_DIR}/{shard}{fmt.SHARD_SUFFIX}", f"shard {shard}")

    # ---- reading tensors -----------------------------------------------------------
    def _handle(self, shard: str, chunk_id: str):
        with self._lock:
            handle = self._handles.get(shard)
            if handle is None:
                path = self.shard_path(shard)
                if not path.exists():
                    raise CorruptShardError(
                        f"shard {path.name} (holding chunk {chunk_id}) is missing from {path.parent}; "
                        "the cache is damaged: rebuild with `kvfuse build-cache`, which rewrites it."
                    )
                try:
                    handle = safe_open(str(path), framework="pt", device="cpu")
                except Exception as e:  # safetensors raises its own error types
                    raise CorruptShardError(
                        f"shard {path.name} (holding chunk {chunk_id}) cannot be read: {e}. "
                        "It is truncated or corrupt: rebuild with `kvfuse build-cache`."
                    ) from e
                self._handles[shard] = handle
            return handle

    def read(self, chunk_id: str, verify: bool = True) -> ChunkData:
        """The tensors of one chunk, memory-mapped from its shard.

        With verify, the bytes are checked against the index checksum (xxh3, ~10 GB/s).
        """
        rec = self.record(chunk_id)
        handle = self._handle(rec.shard, chunk_id)
        where = f"chunk {chunk_id} in shard {rec.shard}{fmt.SHARD_SUFFIX}"
        try:
            kv = handle.get_tensor(fmt.kv_name(chunk_id))
            tokens = handle.get_tensor(fmt.tok_name(chunk_id))
            saliency = handle.get_tensor(fmt.sal_name(chunk_id))
        except Exception as e:
            raise CorruptShardError(f"{where} cannot be read: {e}. Rebuild the cache.") from e
        if verify and fmt.checksum(kv, tokens, saliency) != rec.checksum:
            raise CorruptShardError(
                f"{where} fails its checksum: the shard's bytes were changed after writing "
                "(disk error or tampering). Rebuild with `kvfuse build-cache`."
            )
        if kv.shape[3] != rec.n_tokens or tokens.shape[0] != rec.n_tokens:
            raise CorruptShardError(f"{where} holds {kv.shape[3]} tokens, the index says {rec.n_tokens}.")
        return ChunkData(chunk_id, kv, tokens, saliency, rec.pos_base)

    def stats(self) -> dict:
        recs = self.records()
        return {
            "release": self.release,
            "model": self.model.get("name"),
            "fingerprint": self.model["fingerprint"],
            "dtype": self.model["dtype"],
            "chunks": len(recs),
            "documents": len({r.doc_id for r in recs}),
            "tokens": sum(r.n_tokens for r in recs),
            "shards": len({r.shard for r in self._records.values()}),
            "kv_bytes": sum(r.n_tokens for r in self._records.values()) * self.model["kv_bytes_per_token"],
            "parent": self.manifest.get("parent"),
            "created": self.manifest.get("created"),
        }


def _read_index(path: Path) -> dict[str, ChunkRecord]:
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise StoreError(f"index {path} cannot be read: {e}. The cache is damaged; rebuild it.") from e
    cols = table.to_pydict()
    records = {}
    for i, cid in enumerate(cols["chunk_id"]):
        records[cid] = ChunkRecord(
            chunk_id=cid,
            doc_id=cols["doc_id"][i],
            chunk_no=cols["chunk_no"][i],
            n_tokens=cols["n_tokens"][i],
            shard=cols["shard"][i],
            pos_base=cols["pos_base"][i],
            neighbours=tuple(cols["neighbours"][i] or ()),
            checksum=cols["checksum"][i],
            char_start=cols["char_start"][i],
            char_end=cols["char_end"][i],
            text=cols["text"][i],
        )
    return records
