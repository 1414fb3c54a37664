"""Caches on object storage: `--cache s3://bucket/prefix` or any fsspec URL (docs/object_storage.md).

    cache_dir = local_dir("s3://bucket/kv")   # a local mirror folder, its metadata pulled from the bucket
    remote = remote_of(cache_dir)             # the Remote behind a mirror; None for a plain local folder
    remote.fetch("shards/s-1f2e.safetensors") # download once into the mirror (the local shard cache)
    remote.put("shards/s-1f2e.safetensors", path, create_only=True)
    remote.swap_current("r0002-...")          # conditional write: PublishConflict if CURRENT moved

The rest of the store keeps working on a local folder. For a URL that folder is a
*mirror* under the local shard cache (default ~/.cache/kvfuse/remote/<protocol>/<bucket>/<prefix>,
`--local-cache` or KVFUSE_LOCAL_CACHE): `pull()` copies CURRENT, the history, the
manifests, indexes, shard sums and embeddings into it (one listing, then only what
changed); shards are downloaded when first read, so the pread readers and the
prefetcher read local files. A writer writes into the mirror as before and uploads
each file once: shards when they are flushed (create-only: a name taken by other
bytes gets a unique suffix, so no object is ever replaced), then the index and
manifest (create-only), then CURRENT with a conditional write (S3 `If-Match` on the
ETag seen when the build started, `If-None-Match: *` when there was none).
Local paths never go through this module: `local_dir(path)` is `Path(path)`.

Credentials and endpoint come from the standard places (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ~/.aws/...) or from storage options: `configure(storage_options=...)`
(the CLI's --storage-options JSON) or the KVFUSE_STORAGE_OPTIONS environment variable.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import format as fmt
from .errors import StoreError
from .manifest import HISTORY_FILE

LOCAL_CACHE_ENV = "KVFUSE_LOCAL_CACHE"          # root of the mirrors (the local shard cache)
STORAGE_OPTIONS_ENV = "KVFUSE_STORAGE_OPTIONS"  # JSON, e.g. {"endpoint_url": "http://127.0.0.1:9000"}
EMBEDDINGS_DIR = "embeddings"                   # the relate stage's files (gc and relate import it from here)
METADATA_DIRS = (fmt.RELEASES_DIR, fmt.INDEX_DIR, fmt.SHARDS_DIR, EMBEDDINGS_DIR)
IN_FLIGHT_S = 3600.0  # a mirror file missing from the bucket is deleted by pull() once older than this

_config: dict = {"storage_options": None, "local_cache": None}
_mirrors: dict[Path, "Remote"] = {}   # mirror folder -> its Remote (this process)
_lock = threading.Lock()


class PublishConflict(StoreError):
    """Another publisher replaced CURRENT (or took the release name) first; this release was not published."""


def configure(storage_options: dict | None = None, local_cache: str | Path | None = None) -> None:
    """Set this process's storage options (fsspec/s3fs keyword arguments) and mirror root."""
    if storage_options is not None:
        _config["storage_options"] = dict(storage_options)
    if local_cache is not None:
        _config["local_cache"] = str(local_cache)


def storage_options() -> dict:
    """The configured storage options, else KVFUSE_STORAGE_OPTIONS's JSON, else {}."""
    if _config["storage_options"] is not None:
        return dict(_config["storage_options"])
    text = os.environ.get(STORAGE_OPTIONS_ENV)
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{STORAGE_OPTIONS_ENV} is not JSON ({e.msg}); give e.g. "
                         '\'{"endpoint_url": "http://127.0.0.1:9000"}\'') from None
    if not isinstance(opts, dict):
        raise ValueError(f"{STORAGE_OPTIONS_ENV} must be a JSON object, got {type(opts).__name__}")
    return opts


def local_cache_root() -> Path:
    root = _config["local_cache"] or os.environ.get(LOCAL_CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "kvfuse" / "remote"


def is_url(cache) -> bool:
    """Whether a --cache value names object storage (any fsspec URL but file://)."""
    text = str(cache)
    return "://" in text and not text.startswith("file://") and not isinstance(cache, Path)


def local_dir(cache: str | Path, pull: bool = True) -> Path:
    """The local folder the store works in: the path itself, or a URL's mirror (pulled unless told not)."""
    if not is_url(cache):
        return Path(cache)
    remote = Remote.of(str(cache))
    if pull:
        remote.pull()
    return remote.local


def current_of(url: str) -> str | None:
    """The release CURRENT names in the bucket now (one GET; the mirror is not pulled), None if none."""
    data, _ = Remote.of(url).get(fmt.CURRENT_FILE)
    return (data or b"").decode("utf-8", "replace").strip() or None


def remote_of(cache_dir: str | Path) -> "Remote | None":
    """The Remote whose mirror cache_dir is (in this process), else None: a plain local cache."""
    if is_url(cache_dir):
        return Remote.of(str(cache_dir))
    return _mirrors.get(Path(cache_dir)) if _mirrors else None


def worker_location(cache_dir: str | Path) -> str | tuple[str, dict, str | None]:
    """What a Dask task needs to write into cache_dir on another machine: the local path as a string,
    or (URL, storage options, mirror root if one was set) so the worker uploads its shards itself."""
    remote = remote_of(cache_dir)
    if remote is None:
        return str(cache_dir)
    return remote.url, remote.options, _config["local_cache"] or os.environ.get(LOCAL_CACHE_ENV)


def worker_dir(where: str | tuple[str, dict, str | None]) -> Path:
    """The folder a task writes shards into, from worker_location's value (on the worker)."""
    if isinstance(where, str):
        return Path(where)
    url, options, root = where
    configure(storage_options=options, local_cache=root)
    return local_dir(url, pull=False)


def _precondition_failed(e: Exception) -> bool:
    return isinstance(e, FileExistsError) or "pre-condition" in str(e) or "PreconditionFailed" in str(e)


@dataclass
class _Obj:
    size: int
    mtime: float  # unix seconds (S3: LastModified)


@dataclass
class Remote:
    """A cache on object storage and its local mirror folder."""

    url: str
    fs: object          # fsspec AbstractFileSystem
    root: str           # the cache's path inside fs (no protocol, no trailing /)
    local: Path         # the mirror folder
    options: dict = field(default_factory=dict)  # the storage options fs was made with
    current_tag: str | None = None   # CURRENT's ETag (S3) or bytes (others) when last pulled; None: absent
    _fetch_lock: threading.Lock = field(default_factory=threading.Lock)
    _fetching: dict = field(default_factory=dict)   # rel -> its download lock

    @classmethod
    def of(cls, url: str) -> "Remote":
        """The Remote for url (one per URL and process)."""
        import fsspec  # noqa: PLC0415  (only object-storage caches pay for the import)

        url = url.rstrip("/")
        protocol, _, path = url.partition("://")
        local = local_cache_root() / protocol / path
        options = storage_options()
        with _lock:
            remote = _mirrors.get(local)
            if remote is not None and remote.url == url and remote.options == options:
                return remote
            try:
                fs, root = fsspec.core.url_to_fs(url, **options)
            except ImportError as e:
                raise StoreError(f"--cache {url} needs the fsspec driver for its protocol: {e}. "
                                 "For s3:// install s3fs (`pip install s3fs`).") from e
            remote = cls(url, fs, root.rstrip("/"), local, options)
            _mirrors[local] = remote
            return remote

    # ---- names ---------------------------------------------------------------------------
    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    @property
    def is_s3(self) -> bool:
        return "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.key(rel).partition("/")
        return bucket, key

    def _error(self, what: str, e: Exception) -> StoreError:
        return StoreError(f"{what} {self.url}: {e}. Check the URL, the endpoint (AWS_ENDPOINT_URL or "
                          "--storage-options '{\"endpoint_url\": ...}') and the credentials (AWS_ACCESS_KEY_ID, ...).")

    # ---- reading -------------------------------------------------------------------------
    def listing(self) -> dict[str, _Obj]:
        """rel path -> object, for every object under the cache (one recursive listing)."""
        try:
            self.fs.invalidate_cache()
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise self._error("cannot list", e) from e
        out = {}
        for name, info in found.items():
            rel = name[len(self.root) + 1:] if name.startswith(self.root + "/") else None
            if not rel or info.get("type") == "directory":
                continue
            mtime = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
            mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
            out[rel] = _Obj(int(info.get("size") or 0), mtime)
        return out

    def get(self, rel: str) -> tuple[bytes | None, str | None]:
        """(bytes, tag) of one object, (None, None) if absent; tag is what swap_current compares."""
        try:
            if self.is_s3:
                bucket, key = self._bucket_key(rel)
                resp = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
                return _read_body(self.fs, resp), resp["ETag"]
            data = self.fs.cat_file(self.key(rel))
            return data, data.decode("latin-1")
        except FileNotFoundError:
            return None, None
        except Exception as e:
            raise self._error(f"cannot read {rel} of", e) from e

    def header_digest(self, rel: str, digest) -> tuple[int, str]:
        """(size, digest(header bytes)) of a safetensors object, read by two range requests.
        FileNotFoundError if absent, ValueError if it is too short for its header."""
        key = self.key(rel)
        size = int(self.fs.info(key)["size"])
        head = self.fs.cat_file(key, start=0, end=8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"header length {n} runs past the end of the {size}-byte object")
        return size, digest(head + self.fs.cat_file(key, start=8, end=8 + n))

    def pull(self) -> None:
        """Bring the mirror up to date: CURRENT and the history always, the other metadata when new
        or changed; files deleted from the bucket are deleted here (manifests and indexes once older
        than IN_FLIGHT_S; embedding files are kept: a build's cache). Shards are not downloaded."""
        data, self.current_tag = self.get(fmt.CURRENT_FILE)  # first: the listing then holds all it names
        objs = self.listing()
        for sub in METADATA_DIRS:
            (self.local / sub).mkdir(parents=True, exist_ok=True)
        _write_local(self.local / fmt.CURRENT_FILE, data, objs.get(fmt.CURRENT_FILE))
        hist, _ = self.get(HISTORY_FILE)
        _write_local(self.local / HISTORY_FILE, hist, objs.get(HISTORY_FILE))
        for rel, obj in objs.items():
            if "/" not in rel or rel.split("/")[0] not in METADATA_DIRS or rel.endswith(fmt.SHARD_SUFFIX):
                continue
            path = self.local / rel
            if not path.exists() or path.stat().st_size != obj.size:
                self._download(rel, path, obj)
        now = time.time()
        for sub in METADATA_DIRS:
            if sub == EMBEDDINGS_DIR:  # a build's cache, written here long before its publish uploads it
                continue
            for path in (self.local / sub).iterdir():
                if path.name.startswith(".") or f"{sub}/{path.name}" in objs:
                    continue
                try:  # a young index or manifest may be a publish in flight from another process using
                    # this mirror; a shard (or its sums) lands here only after its upload
                    if sub == fmt.SHARDS_DIR or now - path.stat().st_mtime > IN_FLIGHT_S:
                        path.unlink()
                except FileNotFoundError:
                    pass

    def fetch(self, rel: str) -> Path:
        """The local copy of rel, downloaded first if missing (tmp + rename). FileNotFoundError if absent."""
        path = self.local / rel
        if path.exists():
            return path
        with self._fetch_lock:  # one download per file; different files download in parallel
            lock = self._fetching.setdefault(rel, threading.Lock())
        with lock:
            if not path.exists():
                self._download(rel, path, None)
        return path

    def _download(self, rel: str, path: Path, obj: _Obj | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
        try:
            self.fs.get_file(self.key(rel), str(tmp))
            if obj is not None:
                os.utime(tmp, (obj.mtime, obj.mtime))  # gc ages releases by their mtime
            os.replace(tmp, path)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self._error(f"cannot download {rel} from", e) from e
        finally:
            tmp.unlink(missing_ok=True)

    # ---- writing -------------------------------------------------------------------------
    def put(self, rel: str, src: Path | bytes, create_only: bool = False) -> bool:
        """Upload a local file or bytes to rel. With create_only, never replace an existing object:
        returns False when one is there. StoreError on any other failure."""
        mode = {"mode": "create"} if create_only else {}
        try:
            if isinstance(src, (bytes, bytearray, memoryview)):
                self.fs.pipe_file(self.key(rel), bytes(src), **mode)
            else:
                self.fs.put_file(str(src), self.key(rel), **mode)
        except Exception as e:
            if create_only and _precondition_failed(e):
                return False
            raise self._error(f"cannot upload {rel} to", e) from e
        return True

    def swap_current(self, release: str) -> None:
        """Point CURRENT at release if it still holds what pull() saw, else raise PublishConflict.

        S3: one conditional PUT (If-Match: the ETag pulled, or If-None-Match: * when there was no
        CURRENT): of two publishers that started from the same CURRENT, exactly one succeeds.
        Other stores: compare then write (not atomic; documented)."""
        data = (release + "\n").encode()
        try:
            if self.is_s3:
                bucket, key = self._bucket_key(fmt.CURRENT_FILE)
                cond = {"IfMatch": self.current_tag} if self.current_tag else {"IfNoneMatch": "*"}
                resp = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
                self.current_tag = resp.get("ETag")
                return
            now, tag = self.get(fmt.CURRENT_FILE)
            if tag != self.current_tag:
                raise FileExistsError("CURRENT changed")
            self.fs.pipe_file(self.key(fmt.CURRENT_FILE), data)
            self.current_tag = data.decode("latin-1")
        except Exception as e:
            if not _precondition_failed(e):
                raise self._error("cannot write CURRENT of", e) from e
            now, _ = self.get(fmt.CURRENT_FILE)
            theirs = now.decode("utf-8", "replace").strip() if now else "(none)"
            raise PublishConflict(
                f"another publisher replaced CURRENT of {self.url} while this build ran (it now names {theirs}); "
                f"release {release} was not published and CURRENT was left as the other publisher set it. "
                "The shards this build uploaded are kept (unreferenced; `kvfuse gc` removes them after the grace "
                f"period). Rerun the build to publish on top of {theirs}.") from None

    def append_history(self, line: str) -> None:
        """Add a line to history.jsonl (a conditional read-modify-write on S3, retried)."""
        for _ in range(10):
            data, tag = self.get(HISTORY_FILE)
            body = (data or b"") + line.encode()
            try:
                if self.is_s3:
                    bucket, key = self._bucket_key(HISTORY_FILE)
                    cond = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}
                    self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **cond)
                else:
                    self.fs.pipe_file(self.key(HISTORY_FILE), body)
            except Exception as e:
                if _precondition_failed(e):
                    continue
                raise self._error("cannot write the history of", e) from e
            (self.local / HISTORY_FILE).write_bytes(body)
            return
        raise StoreError(f"cannot append to {self.url}/{HISTORY_FILE}: it kept changing under this writer.")

    def remove(self, rels: list[str]) -> None:
        """Delete objects (and their mirror copies); missing ones are fine."""
        if rels:
            try:
                self.fs.rm([self.key(r) for r in rels])
            except FileNotFoundError:
                pass
            except Exception as e:
                raise self._error("cannot delete from", e) from e
        for rel in rels:
            (self.local / rel).unlink(missing_ok=True)


def _read_body(fs, resp) -> bytes:
    """The bytes of an s3fs call_s3('get_object') response (an aiobotocore stream)."""
    from fsspec.asyn import sync  # noqa: PLC0415

    async def read():
        async with resp["Body"] as body:
            return await body.read()

    return sync(fs.loop, read)


def _write_local(path: Path, data: bytes | None, obj: _Obj | None) -> None:
    """Mirror a small mutable file (CURRENT, history): written tmp + rename, removed when absent."""
    if data is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_bytes(data)
    if obj is not None:
        os.utime(tmp, (obj.mtime, obj.mtime))
    os.replace(tmp, path)
