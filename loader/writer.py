"""Writing shards and publishing releases, crash-safe (DESIGN §2).

Every file is written to a temporary name, fsynced and renamed into place, and
`CURRENT` is replaced last: a crash at any point leaves the previous release
whole, and a rerun finds the shards already written (`scan_shards`), verifies
them against the sums their writer recorded, and skips their chunks.
"""

from __future__ import annotations

import errno
import fcntl
import filecmp
import json
import os
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from . import format as fmt
from .errors import StoreError
from .fs import PublishConflict, Remote, remote_of
from .manifest import (
    DIGEST_SUFFIX, SUMS_SUFFIX, append_history, list_releases, manifest_path, move_into_place,
    read_current, read_shard_sums, shard_header_digest, tmp_name, write_atomic, write_current, write_index,
    write_manifest, write_shard_sums,
)
from .manifest import fsync_dir  # noqa: F401  (re-exported)
from .quant import kv_codec


def init_cache_dir(cache_dir: Path) -> None:
    """Create the cache's folders. A path that is a file, or a folder that can't be created, is a clear error."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise StoreError(f"--cache {cache_dir} is a file, not a folder: give a folder (it is created if missing).")
    for sub in (fmt.RELEASES_DIR, fmt.INDEX_DIR, fmt.SHARDS_DIR):
        path = cache_dir / sub
        if path.exists() and not path.is_dir():  # a dangling symlink, or a file where a folder belongs
            raise StoreError(f"{path} exists but is not a folder (a broken link?); fix or remove it.")
        path.mkdir(parents=True, exist_ok=True)


def remove_stale_tmp(cache_dir: Path) -> int:
    """Delete temporary files left by a killed writer. Returns how many."""
    n = 0
    for sub in (fmt.SHARDS_DIR, fmt.INDEX_DIR, fmt.RELEASES_DIR, "."):
        for p in (cache_dir / sub).glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


@contextmanager
def cache_lock(cache_dir: Path, dry_run: bool = False):
    """One writer per cache folder at a time (readers never lock).

    With dry_run a folder we may not write (read-only disk, another user's cache)
    is not locked: nothing will be changed.
    """
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise StoreError(f"--cache {cache_dir} is a file, not a folder: give a folder (it is created if missing).")
    try:
        if not dry_run:
            cache_dir.mkdir(parents=True, exist_ok=True)
        f = open(cache_dir / ".lock", "a")
    except OSError as e:
        if dry_run and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            yield
            return
        raise StoreError(f"cannot write to the cache folder {cache_dir}: {e.strerror}. "
                         "Check its permissions and free space.") from e
    with f:
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
    """Where the writer put a chunk: its shard, the checksum of the bytes it wrote, and the
    shard's size and header digest (for the release manifest)."""

    chunk_id: str
    shard: str
    checksum: str
    shard_bytes: int = 0
    shard_header: str = ""


@dataclass
class ShardWriter:
    """Buffers chunk tensors and writes them as immutable shards of ~target_bytes.

    Every checksum and digest is taken from what this writer wrote: the chunk checksums
    from the tensors it was given, the shard's size and header digest from its temporary
    file before the rename. They are kept next to the shard in `<shard>.sums.json`
    (written before the shard), so a rerun can verify a shard a killed build left behind
    instead of trusting it.

    The KV is stored as `metadata["kv_dtype"]` says (absent: the model's dtype): with "fp8"
    or "int8" each chunk's KV is quantised here (`loader/quant.py`, on the KV's device, so a
    GPU build copies the codes, not the model-dtype KV, to the host) and its scales written
    beside it; the checksum covers them.
    """

    cache_dir: Path
    metadata: dict[str, str]
    target_bytes: int = 1 << 30
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending: list[tuple[str, str]] = field(default_factory=list)  # (chunk_id, checksum)
    _bytes: int = 0
    written: list[WrittenChunk] = field(default_factory=list)

    def add(self, chunk_id: str, kv: torch.Tensor, tokens: torch.Tensor, saliency: torch.Tensor,
            scales: torch.Tensor | None = None) -> None:
        """Buffer one chunk: kv [L, 2, H_kv, T, D] in the model dtype (any device), tokens [T],
        saliency [S, T]. Writes a shard once ~target_bytes are buffered. With `scales`
        ([L, H_kv, W] bfloat16) kv holds the codes the store's codec already made
        (`KVCodec.encode`, e.g. on the GPU), stored as they are; raises ValueError if they are
        not in the codec's code dtype."""
        tokens = tokens.detach().to(torch.int32).contiguous().cpu()  # [T]
        saliency = saliency.detach().to(torch.float16).contiguous().cpu()  # [S, T]
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != tokens.shape[0]:
            raise ValueError(f"chunk {chunk_id}: kv must be [L, 2, H_kv, T, D] with T={tokens.shape[0]}, got {tuple(kv.shape)}")
        codec = kv_codec(self.metadata.get("kv_dtype"))
        if scales is None:
            codes, scales = codec.encode(kv.detach())
        elif not codec.quantised or kv.dtype != codec.code_dtype:
            raise ValueError(f"chunk {chunk_id}: codes of dtype {kv.dtype} with scales, but this store holds "
                             f"{codec.name} KV; pass the model-dtype KV without scales")
        else:
            codes = kv.detach()
        codes = codes.contiguous().cpu()                             # [L, 2, H_kv, T, D] stored dtype
        stored = [codes, tokens, saliency] + ([] if scales is None else [scales.cpu()])  # + [L, H_kv, W] bf16
        for name, t in zip(fmt.tensor_names(chunk_id, scales is not None), stored):
            self._tensors[name] = t
        self._pending.append((chunk_id, fmt.checksum(*stored)))
        self._bytes += sum(t.numel() * t.element_size() for t in stored)
        if self._bytes >= self.target_bytes:
            self.flush()

    def flush(self) -> list[WrittenChunk]:
        """Write what is buffered as one shard; returns the chunks it holds.

        Raises StoreError (disk full, no permission) naming the shard; nothing half-written stays.
        """
        if not self._pending:
            return []
        ids = sorted(cid for cid, _ in self._pending)
        shard = "s-" + xxhash.xxh3_64("\n".join(ids).encode()).hexdigest()
        path = self.cache_dir / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}"
        tmp = tmp_name(path)
        try:
            try:
                _save_file(self._tensors, tmp, self.metadata)
                # the header this writer just wrote, read back before the file is published
                size, header = shard_header_digest(tmp)
                if (remote := remote_of(self.cache_dir)) is not None:  # object storage: upload before publishing
                    shard = _upload_shard(remote, tmp, shard, {"bytes": size, "header": header,
                                                               "metadata": self.metadata, "chunks": dict(self._pending)})
                    path = self.cache_dir / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}"
                # Same content = same name: a rerun needn't replace a shard whose bytes are the
                # same, but replaces a torn or corrupt one (its chunks were recomputed: here).
                same = path.exists() and path.stat().st_size == size and filecmp.cmp(tmp, path, shallow=False)
                if not same or read_shard_sums(self.cache_dir, shard) is None:
                    write_shard_sums(self.cache_dir, shard, {"bytes": size, "header": header,
                                                             "metadata": self.metadata, "chunks": dict(self._pending)})
                if not same:
                    move_into_place(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise StoreError(f"cannot write shard {path}: {e.strerror or e}. Nothing was published; free space "
                             "(or fix permissions) and rerun: the shards already written are reused.") from e
        done = [WrittenChunk(cid, shard, ck, size, header) for cid, ck in self._pending]
        self.written.extend(done)
        self._tensors, self._pending, self._bytes = {}, [], 0
        return done


def _upload_shard(remote: Remote, tmp: Path, shard: str, sums: dict) -> str:
    """Upload a shard (create-only) and then its sums; returns the name it got. An object of that
    name holding other bytes (another publisher's) is never replaced: this one gets a unique name."""
    name = shard
    for _ in range(3):
        if remote.put(f"{fmt.SHARDS_DIR}/{name}{fmt.SHARD_SUFFIX}", tmp, create_only=True):
            remote.put(f"{fmt.SHARDS_DIR}/{name}{SUMS_SUFFIX}", json.dumps(sums, sort_keys=True).encode())
            return name
        theirs, _ = remote.get(f"{fmt.SHARDS_DIR}/{name}{SUMS_SUFFIX}")
        try:
            if theirs is not None and json.loads(theirs) == sums:
                return name  # the same bytes (sizes, header, every chunk checksum) are there already
        except ValueError:
            pass
        name = f"{shard}-{uuid.uuid4().hex[:8]}"
    raise StoreError(f"cannot upload shard {shard} to {remote.url}: its names kept being taken.")


def _save_file(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors' save_file, its I/O errors raised as OSError (errno kept: ENOSPC is told apart)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:  # SafetensorError("... I/O error: No space left on device (os error 28)")
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


def scan_shards(cache_dir: Path) -> dict[str, dict]:
    """shard -> its sums (see ShardWriter) for every shard file on disk whose sums file is readable.

    A shard without sums (written by an older kvfuse, or its sums lost) is not listed:
    nothing in it can be verified, so its chunks are recomputed.
    """
    folder = Path(cache_dir) / fmt.SHARDS_DIR
    found: dict[str, dict] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob(f"*{fmt.SHARD_SUFFIX}")):
        shard = path.name.removesuffix(fmt.SHARD_SUFFIX)
        if fmt.is_safe_name(shard) and (sums := read_shard_sums(cache_dir, shard)) is not None:
            found[shard] = sums
    return found


def verify_leftover(cache_dir: Path, shard: str, sums: dict, chunk_ids) -> dict[str, str]:
    """chunk_id -> checksum for those of chunk_ids in a shard outside any release whose bytes
    match what its writer recorded (size, header digest, chunk checksums). Never trusts the
    bytes on disk: a checksum is only compared. Raises StoreError if the shard is unreadable
    or its size/header changed (then none of its chunks is usable)."""
    path = Path(cache_dir) / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}"
    try:
        if shard_header_digest(path) != (sums["bytes"], sums["header"]):
            raise ValueError("its size or header differs from what its writer recorded")
        good = {}
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for cid in chunk_ids:
                want = sums["chunks"].get(cid)
                names = fmt.tensor_names(cid, fmt.kvs_name(cid) in keys)
                got = fmt.checksum(*(f.get_tensor(n) for n in names))
                if want is not None and got == want:
                    good[cid] = want
        return good
    except Exception as e:  # safetensors raises its own types
        raise StoreError(f"{fmt.SHARDS_DIR}/{path.name} is damaged: {e}") from e


def next_release_id(cache_dir: Path) -> str:
    existing = [r for r in list_releases(cache_dir) if r.startswith("r") and r[1:5].isdigit()]
    n = max((int(r[1:5]) for r in existing), default=0) + 1
    return f"r{n:04d}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"


def shard_entries(cache_dir: Path, rows: list[dict], known: dict[str, dict] | None = None) -> dict[str, dict]:
    """{shard: {"bytes", "header"}} for every shard the rows use: from `known` (what the writer
    or an earlier manifest recorded), else from the shard's sums file, else read off the disk."""
    out = {}
    for shard in sorted({r["shard"] for r in rows}):
        entry = (known or {}).get(shard)
        if entry is None:
            sums = read_shard_sums(cache_dir, shard)
            if sums is not None:
                entry = {"bytes": sums["bytes"], "header": sums["header"]}
            else:
                size, head = shard_header_digest(Path(cache_dir) / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}")
                entry = {"bytes": size, "header": head}
        out[shard] = {"bytes": int(entry["bytes"]), "header": str(entry["header"])}
    return out


def publish_release(cache_dir: Path, rows: list[dict], manifest: dict, shards: dict[str, dict] | None = None,
                    parent: str | None | bool = True) -> str:
    """Write the index and manifest of a new release, then point CURRENT at it and log it.

    `rows` are index rows (see manifest.INDEX_SCHEMA); `manifest` the release's model,
    params and stats; `shards` {shard: {"bytes", "header"}} as the writer recorded them
    (missing ones are taken from the shards' sums files); `parent` the release this one
    follows (default: CURRENT's). Returns the new release id. The caller holds cache_lock.
    """
    cache_dir = Path(cache_dir)
    release = next_release_id(cache_dir)
    index_rel = f"{fmt.INDEX_DIR}/{release}.parquet"
    try:
        index = write_index(cache_dir / index_rel, rows)
    except OSError as e:
        raise StoreError(f"cannot write the index {cache_dir / index_rel}: {e.strerror or e}. Nothing was "
                         "published (the previous release is still current); free space and rerun.") from e
    if parent is True:
        try:
            parent = read_current(cache_dir)
        except StoreError:
            parent = None
    manifest = {
        **manifest,
        "release": release,
        "format_version": fmt.FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parent": parent or None,
        "index": index_rel,
        "index_digest": index.as_dict(),
        "shards": shard_entries(cache_dir, rows, shards),
    }
    try:
        write_manifest(cache_dir, manifest)
        if (remote := remote_of(cache_dir)) is not None:
            _publish_remote(remote, cache_dir, release, manifest)
        write_current(cache_dir, release)
    except OSError as e:
        raise StoreError(f"cannot publish release {release} in {cache_dir}: {e.strerror or e}. The previous "
                         "release is still current; free space and rerun.") from e
    if remote is not None:
        remote.append_history(json.dumps({"release": release, "at": time.time()}) + "\n")
    else:
        append_history(cache_dir, release)
    return release


def _publish_remote(remote: Remote, cache_dir: Path, release: str, manifest: dict) -> None:
    """Upload a release written into the mirror: embeddings it lists, then its index and manifest
    (create-only), then CURRENT (conditional). On a conflict the index and manifest it uploaded
    are deleted again and PublishConflict is raised; CURRENT is untouched."""
    for name in manifest.get("embeddings", []):
        rel = f"embeddings/{name}"
        if fmt.is_safe_name(name) and (cache_dir / rel).exists():
            remote.put(rel, cache_dir / rel, create_only=True)  # immutable, named by content: there or ours
    mpath = manifest_path(cache_dir, release)
    files = [manifest["index"], f"{fmt.RELEASES_DIR}/{mpath.name}{DIGEST_SUFFIX}", f"{fmt.RELEASES_DIR}/{mpath.name}"]
    objs = remote.listing()  # every shard the release names must be in the bucket (a concurrent gc?)
    for shard, entry in manifest.get("shards", {}).items():
        obj = objs.get(f"{fmt.SHARDS_DIR}/{shard}{fmt.SHARD_SUFFIX}")
        if obj is None or obj.size != int(entry["bytes"]):
            raise StoreError(f"shard {shard} of release {release} is {'missing from' if obj is None else 'changed in'} "
                             f"{remote.url} (collected by a concurrent `kvfuse gc`?); nothing was published. Rerun "
                             "the build: it recomputes what is gone.")
    uploaded = []
    try:
        for rel in files:
            if not remote.put(rel, cache_dir / rel, create_only=True):
                raise PublishConflict(f"another publisher took the release name {release} in {remote.url} first; "
                                      "nothing of this build was published. Rerun the build.")
            uploaded.append(rel)
        remote.swap_current(release)
    except PublishConflict:
        try:
            remote.remove(uploaded)
        except StoreError:
            pass
        for rel in files:
            (cache_dir / rel).unlink(missing_ok=True)
        raise
