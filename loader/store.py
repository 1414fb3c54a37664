"""Reading a release of the chunk KV store (DESIGN §2).

    store = Store.open("cache/")            # pins the release CURRENT names now
    store.check_model(spec.fingerprint, "float32")
    chunk = store.read(chunk_id)            # ChunkData: kv [L, 2, H_kv, T, D], tokens [T], saliency [S, T]
    store.codec                             # how the KV is stored (model dtype, fp8, int8: loader/quant.py)

Shards are memory-mapped through `safetensors.safe_open`; a reader keeps the
release it opened even while a newer one is published (shards are immutable and
only `kvfuse gc` deletes them, never those of a kept release).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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
from .fs import local_dir, remote_of
from .quant import KVCodec, kv_codec
from .manifest import (
    ChunkRecord,
    header_digest,
    index_digest,
    list_releases,
    manifest_path,
    read_current,
    read_index,
    read_manifest,
    shard_header_digest,
    shown_cache,
)

__all__ = ["ChunkData", "ChunkRecord", "Store", "list_releases", "read_current", "verify_release"]

LEASES_DIR = "leases"      # <cache>/leases/<id>.json: a live reader's release (see Store.open)
LEASE_TTL_S = 600.0        # a lease not refreshed for this long is stale (its reader died)
DAMAGE_FILE = ".damaged"   # readers note shards that failed here; the next build verifies checksums


@dataclass
class ChunkData:
    chunk_id: str
    kv: torch.Tensor        # [L, 2, H_kv, T, D] model dtype, keys rotated at pos_base..pos_base+T-1
    tokens: torch.Tensor    # [T] int32
    saliency: torch.Tensor  # [S, T] float16
    pos_base: int


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


def _repair_advice(cache_dir: Path) -> str:
    shown = shown_cache(cache_dir)   # an object-storage cache's URL, not its mirror
    return (f"Run `kvfuse verify {shown}` to list every damaged chunk, then "
            f"`kvfuse build-cache CORPUS --cache {shown} --repair` to recompute them.")


class _MixedKV(Exception):
    """A chunk's KV dtype is not its release's (caught in Store.read)."""


def note_damage(cache_dir: Path, shard: str) -> None:
    """Remember (best effort) that a read of shard failed, so the next build checks checksums."""
    try:
        with open(Path(cache_dir) / DAMAGE_FILE, "a") as f:
            f.write(shard + "\n")
    except OSError:
        pass


class Store:
    """A read-only view of one release.

    One index row per (document, chunk number); identical chunks share a chunk_id and
    its KV on disk. `records()` lists the rows, `record(chunk_id)` / `read(chunk_id)`
    give the chunk's metadata and tensors, `rows_of(chunk_id)` every document it is in.
    """

    def __init__(self, cache_dir: Path, manifest: dict, rows: list[ChunkRecord]):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.release: str = manifest["release"]
        self._rows = rows
        self._records: dict[str, ChunkRecord] = {}
        self._docs: dict[str, list[ChunkRecord]] = {}
        for rec in rows:
            self._records.setdefault(rec.chunk_id, rec)
            self._docs.setdefault(rec.chunk_id, []).append(rec)
        self._handles: dict[str, object] = {}
        self._checked: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._lease: _Lease | None = None
        try:
            self.codec: KVCodec = kv_codec(manifest["model"].get("kv_dtype"),  # v1: no kv_dtype = "model"
                                           manifest["model"].get("kv_scheme"))
        except ValueError as e:
            raise StoreError(f"release {self.release} of {cache_dir}: {e}; this kvfuse is older than the "
                             "store's writer, upgrade it.") from None

    # ---- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, cache_dir: str | Path, release: str | None = None, lease: bool = True) -> "Store":
        """Open `release` (default: the one CURRENT names now) and check its manifest and index.

        With lease, the reader registers the release under <cache>/leases/ (refreshed while
        it reads, removed on close) so that `kvfuse gc` keeps it; on a read-only cache no
        lease is written. Raises NoReleaseError, StoreError (damaged: the file is named),
        UnsafePathError.
        """
        given, cache_dir = cache_dir, local_dir(cache_dir)  # a URL: its local mirror, metadata pulled (loader/fs.py)
        if not cache_dir.is_dir():
            raise NoReleaseError(f"no cache folder at {cache_dir}; build one with `kvfuse build-cache`.")
        for attempt in range(3):
            name = release or read_current(cache_dir)
            if name is None:
                inner = [p.parent for p in sorted(cache_dir.glob(f"*/{fmt.CURRENT_FILE}"))]  # e.g. the demo's folder
                todo = (f"did you mean {inner[0]}?" if inner
                        else f"build one with `kvfuse build-cache CORPUS --cache {given}`.")
                raise NoReleaseError(f"{given} has no current release (no {fmt.CURRENT_FILE} file); {todo}")
            held = _Lease.take(cache_dir, name) if lease else None  # before reading: gc then keeps it
            try:
                store = cls._open(cache_dir, name)
            except StoreError:
                if held is not None:
                    held.release()
                collected = not manifest_path(cache_dir, name).exists()
                if collected and release is None and attempt < 2 and read_current(cache_dir) != name:
                    continue  # gc collected it between our reading CURRENT and the manifest: CURRENT moved on
                raise
            store._lease = held
            return store
        raise AssertionError("unreachable")

    @classmethod
    def _open(cls, cache_dir: Path, release: str) -> "Store":
        manifest = read_manifest(cache_dir, release)
        index_path = _inside(cache_dir, str(manifest["index"]), f"release {release}'s index")
        try:
            rows = read_index(index_path, index_digest(manifest))
        except StoreError:
            if not manifest_path(cache_dir, release).exists():  # collected while we read
                raise NoReleaseError(f"release {release} was collected by `kvfuse gc` while it was being opened; "
                                     "open the current one.") from None
            raise
        for rec in rows:
            if not fmt.is_safe_name(rec.shard):
                raise UnsafePathError(
                    f"index row {rec.chunk_id} names shard {rec.shard!r}, which is not a plain file "
                    "name inside the cache folder; refusing it."
                )
        return cls(cache_dir, manifest, rows)

    def close(self) -> None:
        """Drop the shard handles and the reader lease."""
        with self._lock:
            self._handles.clear()
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- metadata ------------------------------------------------------------------
    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: what `read` returns (a quantised store's codes are decoded to it)."""
        return fmt.dtype_from_name(self.model["dtype"])

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
                f"fingerprint {fingerprint}. Use the same model, or build a cache for this one in another folder "
                f"(`kvfuse build-cache CORPUS --cache NEW_DIR --model ...`)."
            )
        if have["dtype"] != want_dtype:
            raise ModelMismatchError(
                f"cache {self.cache_dir} holds {have['dtype']} KV but the model runs in {want_dtype}; "
                f"load the model with dtype={have['dtype']}, or build a cache for {want_dtype} in another folder "
                f"(`kvfuse build-cache CORPUS --cache NEW_DIR --dtype {want_dtype}`)."
            )

    def records(self, include_prefix: bool = False) -> list[ChunkRecord]:
        """Every index row, one per (document, chunk number), sorted by (doc_id, chunk_no)."""
        rows = self._rows
        if not include_prefix:
            rows = [r for r in rows if r.doc_id != fmt.PREFIX_DOC_ID]
        return sorted(rows, key=lambda r: (r.doc_id, r.chunk_no))

    def record(self, chunk_id: str) -> ChunkRecord:
        """The first row of chunk_id (shard, checksum, pos_base are the same in all its rows)."""
        try:
            return self._records[chunk_id]
        except KeyError:
            raise UnknownChunkError(
                f"unknown chunk id {chunk_id!r} in release {self.release} of {self.cache_dir}"
            ) from None

    def rows_of(self, chunk_id: str) -> list[ChunkRecord]:
        """Every (document, chunk number) whose text is chunk_id's."""
        self.record(chunk_id)
        return list(self._docs[chunk_id])

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._records

    def chunk_ids(self) -> list[str]:
        """Every stored chunk id of the release: the shared prefix first, then the rest sorted."""
        prefix = self.prefix_id
        return [prefix] + sorted(c for c in self._records if c != prefix)

    def __len__(self) -> int:
        """Distinct chunks (stored KV), the prefix included."""
        return len(self._records)

    def shard_path(self, shard: str, chunk_id: str | None = None, fetch: bool = True) -> Path:
        """The shard's file, checked once per reader: inside the shards folder (which may be a
        link to another disk), and of the size and header digest its manifest records.
        A cache on object storage downloads the shard first; with fetch=False a shard not yet
        downloaded is checked in the bucket (size + header read by range) and not downloaded.
        Raises UnsafePathError, CorruptShardError."""
        with self._lock:
            path = self._checked.get(shard)
        if path is None:
            path = self._check_shard(shard, chunk_id, fetch)
            if path.exists():
                with self._lock:
                    self._checked[shard] = path
        return path

    def _check_shard(self, shard: str, chunk_id: str | None, fetch: bool = True) -> Path:
        if not fmt.is_safe_name(shard):
            raise UnsafePathError(f"shard name {shard!r} is not a plain file name; refusing it.")
        folder = (self.cache_dir / fmt.SHARDS_DIR).resolve()  # a symlinked shards/ folder is fine
        path = (folder / f"{shard}{fmt.SHARD_SUFFIX}").resolve()
        if path.parent != folder:
            raise UnsafePathError(f"shard {shard} is a link to {path}, outside the shards folder {folder}; refusing it.")
        where = f"shard {path.name} in {folder}" + (f" (holding chunk {chunk_id})" if chunk_id else "")
        remote = None if path.exists() else remote_of(self.cache_dir)
        if remote is not None and fetch:
            try:  # object storage: download once into the local shard cache
                remote.fetch(f"{fmt.SHARDS_DIR}/{path.name}")
            except FileNotFoundError:
                pass
            remote = None
        if not path.exists() and remote is None:
            if not (self.cache_dir / fmt.RELEASES_DIR / f"{self.release}.json").exists():
                raise NoReleaseError(
                    f"release {self.release} was collected by `kvfuse gc` while this reader held it (shard "
                    f"{path.name} is gone); reopen the store to read the current release.")
            note_damage(self.cache_dir, shard)
            raise CorruptShardError(f"{where} is missing; the cache is damaged. {_repair_advice(self.cache_dir)}")
        want = self.manifest.get("shards", {}).get(shard)
        if want is not None:
            try:
                size, head = shard_header_digest(path) if remote is None else \
                    remote.header_digest(f"{fmt.SHARDS_DIR}/{path.name}", header_digest)
            except (OSError, ValueError) as e:
                note_damage(self.cache_dir, shard)
                raise CorruptShardError(f"{where} cannot be read: {e}. {_repair_advice(self.cache_dir)}") from e
            if size != want["bytes"] or head != want["header"]:
                note_damage(self.cache_dir, shard)
                what = f"is {size} bytes, the manifest says {want['bytes']}" if size != want["bytes"] else \
                    "has a header that does not match its digest in the manifest"
                raise CorruptShardError(f"{where} {what} (truncated or changed after writing). "
                                        f"{_repair_advice(self.cache_dir)}")
        return path

    # ---- reading tensors -----------------------------------------------------------
    def _handle(self, shard: str, chunk_id: str):
        path = self.shard_path(shard, chunk_id)
        with self._lock:
            handle = self._handles.get(shard)
            if handle is None:
                try:
                    handle = safe_open(str(path), framework="pt", device="cpu")
                except Exception as e:  # safetensors raises its own error types
                    note_damage(self.cache_dir, shard)
                    raise CorruptShardError(
                        f"shard {path.name} (holding chunk {chunk_id}) cannot be read: {e}. "
                        f"It is truncated or corrupt. {_repair_advice(self.cache_dir)}"
                    ) from e
                self._handles[shard] = handle
            return handle

    def read(self, chunk_id: str, verify: bool = True) -> ChunkData:
        """The tensors of one chunk, memory-mapped from its shard; kv in the model's dtype
        (quantised KV is dequantised here, on the CPU).

        With verify, the bytes are checked against the index checksum (xxh3, ~10 GB/s).
        Raises UnknownChunkError, CorruptShardError (naming the shard and chunk).
        """
        rec = self.record(chunk_id)
        if self._lease is not None:
            self._lease.refresh()
        handle = self._handle(rec.shard, chunk_id)
        where = f"chunk {chunk_id} in shard {rec.shard}{fmt.SHARD_SUFFIX}"
        try:
            names = fmt.tensor_names(chunk_id, self.codec.quantised)
            kv = handle.get_tensor(names[0])  # [L, 2, H_kv, T, D] as stored
            if kv.dtype != self.codec.storage_dtype(self.dtype):
                raise _MixedKV()
            stored = [kv] + [handle.get_tensor(n) for n in names[1:]]  # + tokens, saliency (+ scales [L, H_kv, W])
        except _MixedKV:
            note_damage(self.cache_dir, rec.shard)
            raise CorruptShardError(f"{where} holds {fmt.dtype_name(kv.dtype)} KV but release {self.release} is a "
                                    f"{self.codec.name} store of {fmt.dtype_name(self.dtype)}: a chunk of another "
                                    f"build was mixed in. {_repair_advice(self.cache_dir)}") from None
        except Exception as e:
            note_damage(self.cache_dir, rec.shard)
            raise CorruptShardError(f"{where} cannot be read: {e}. {_repair_advice(self.cache_dir)}") from e
        tokens, saliency = stored[1:3]
        if verify and fmt.checksum(*stored) != rec.checksum:
            note_damage(self.cache_dir, rec.shard)
            raise CorruptShardError(
                f"{where} fails its checksum: the shard's bytes were changed after writing "
                f"(disk error or tampering). {_repair_advice(self.cache_dir)}"
            )
        if kv.shape[3] != rec.n_tokens or tokens.shape[0] != rec.n_tokens:
            note_damage(self.cache_dir, rec.shard)
            raise CorruptShardError(f"{where} holds {kv.shape[3]} tokens, the index says {rec.n_tokens}. "
                                    f"{_repair_advice(self.cache_dir)}")
        if self.codec.quantised:
            kv = self.codec.decode(kv, stored[3], self.dtype)
        return ChunkData(chunk_id, kv, tokens, saliency, rec.pos_base)

    def stored_bytes(self, n_tokens: int) -> int:
        """Bytes of KV a chunk of n_tokens stores: codes and scales of a quantised store, else the
        model dtype's KV (what a read moves off disk; `read` returns the dequantised tensor)."""
        m = self.model
        if "n_layers" not in m:   # a store from before the manifest held the geometry: model dtype
            return n_tokens * m["kv_bytes_per_token"]
        L, H, D = m["n_layers"], m["n_kv_heads"], m["head_dim"]
        codes = n_tokens * L * 2 * H * D * self.codec.storage_dtype(self.dtype).itemsize
        return codes + L * H * self.codec.row_width(D, n_tokens) * self.codec.scale_dtype.itemsize

    def kv_bytes(self) -> int:
        """Bytes of stored KV (codes and scales) of the release's distinct chunks."""
        return sum(self.stored_bytes(r.n_tokens) for r in self._records.values())

    def stats(self) -> dict:
        """What `kvfuse inspect` shows: release, model, counts, KV dtype and bytes (per stored token)."""
        recs = self.records()
        stored_tokens = sum(r.n_tokens for r in self._records.values())
        kv_bytes = self.kv_bytes()
        return {
            "release": self.release,
            "model": self.model.get("name"),
            "fingerprint": self.model["fingerprint"],
            "dtype": self.model["dtype"],
            "chunks": len(recs),
            "distinct_chunks": len({r.chunk_id for r in recs}),
            "documents": len({r.doc_id for r in recs}),
            "tokens": sum(r.n_tokens for r in recs),
            "shards": len({r.shard for r in self._rows}),
            "kv_dtype": self.codec.name,
            "kv_bytes": kv_bytes,
            "kv_bytes_per_token": round(kv_bytes / max(1, stored_tokens), 1),
            "format_version": self.manifest.get("format_version"),
            "parent": self.manifest.get("parent"),
            "created": self.manifest.get("created"),
        }


# ---------------------------------------------------------------- verification

@dataclass
class Problem:
    """One thing wrong with a release: the file, the chunks it takes down (none for metadata)."""

    file: str
    message: str
    chunks: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    release: str | None
    problems: list[Problem] = field(default_factory=list)
    chunks: int = 0            # distinct chunks checked
    checksummed: bool = False  # whether chunk bytes were checksummed (else size + header only)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_chunks(self) -> set[str]:
        return {c for p in self.problems for c in p.chunks}


def verify_release(cache_dir: str | Path, release: str | None = None, checksums: bool = True,
                   store: Store | None = None) -> VerifyReport:
    """Check a release end to end: CURRENT, manifest digest, index digest, every shard's size and
    header digest and (with checksums) every chunk's bytes. Never raises for damage: each
    problem names its file and the chunks it affects. Raises NoReleaseError for a `release`
    id the cache does not have (a wrong argument, not damage: nothing to repair)."""
    if store is None:
        cache_dir = local_dir(cache_dir)
        try:
            store = Store.open(cache_dir, release, lease=False)
        except NoReleaseError as e:
            if release is not None:   # an id the cache lacks: the caller's mistake, nothing to repair
                raise
            return VerifyReport(release, [Problem(_named_file(cache_dir, release), str(e))])
        except StoreError as e:
            return VerifyReport(release, [Problem(_named_file(cache_dir, release), str(e))])
    report = VerifyReport(store.release, chunks=len(store), checksummed=checksums)
    by_shard: dict[str, list[ChunkRecord]] = {}
    for rec in store._records.values():
        by_shard.setdefault(rec.shard, []).append(rec)
    for shard, recs in sorted(by_shard.items()):
        ids = sorted(r.chunk_id for r in recs)
        try:
            store.shard_path(shard, fetch=checksums)  # object storage: header by range read unless checksummed
            if checksums:
                store._handle(shard, ids[0])
        except StoreError as e:
            report.problems.append(Problem(f"{fmt.SHARDS_DIR}/{shard}{fmt.SHARD_SUFFIX}", str(e), ids))
            continue
        if not checksums:
            continue
        for cid in ids:
            try:
                store.read(cid, verify=True)
            except StoreError as e:
                report.problems.append(Problem(f"{fmt.SHARDS_DIR}/{shard}{fmt.SHARD_SUFFIX}", str(e), [cid]))
    return report


def _named_file(cache_dir: Path, release: str | None) -> str:
    try:
        release = release or read_current(cache_dir)
    except StoreError:
        return fmt.CURRENT_FILE
    return f"{fmt.RELEASES_DIR}/{release}.json" if release else fmt.CURRENT_FILE


# ---------------------------------------------------------------- reader leases

@dataclass
class _Lease:
    """<cache>/leases/<host>-<pid>-<id>.json naming the release a live reader holds.

    Refreshed (mtime) at most every TTL/4 while the reader reads; gc keeps the release while
    the reader's process lives (same host) or the lease is fresh (another host)."""

    path: Path
    touched: float

    @classmethod
    def take(cls, cache_dir: Path, release: str) -> "_Lease | None":
        folder = cache_dir / LEASES_DIR
        path = folder / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        try:
            folder.mkdir(exist_ok=True)
            path.write_text(f'{{"release": "{release}", "pid": {os.getpid()}, "host": "{socket.gethostname()}"}}\n')
        except OSError:
            return None  # a read-only cache: gc's grace period covers this reader
        return cls(path, time.time())

    def refresh(self) -> None:
        now = time.time()
        if now - self.touched > LEASE_TTL_S / 4:
            try:
                os.utime(self.path)
            except OSError:
                pass
            self.touched = now

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __del__(self):  # a reader dropped without close()
        try:
            self.path.unlink(missing_ok=True)
        except Exception:
            pass
