"""A release's metadata, written and read in one place (DESIGN §2; issue 10 item 6).

    digest = write_index(path, rows)                  # parquet; Digest(bytes, xxh3_128) of what was written
    rows = read_index(path, expect=digest)            # refuses a file whose size or digest changed
    write_manifest(cache_dir, manifest)               # releases/<r>.json + releases/<r>.json.xxh3
    manifest = read_manifest(cache_dir, release)      # checks the digest sidecar, UTF-8, JSON, keys
    write_current(cache_dir, release); read_current(cache_dir)
    append_history(cache_dir, release); read_history(cache_dir)   # what was current, when
    write_shard_sums(cache_dir, shard, sums); read_shard_sums(cache_dir, shard)

Integrity chain: `CURRENT` names a release; the manifest's bytes are checked against
the xxh3-128 digest in its sidecar; the manifest records the index file's size and
digest and, per shard, its size and the digest of its safetensors header; each index
row carries the checksum of its chunk's tensors. Every digest is computed once, from
the bytes the writer wrote, and afterwards only compared.

Every reader error names the file and says what to do.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from . import format as fmt
from .errors import NoReleaseError, StoreError, UnsafePathError

# ---------------------------------------------------------------- index schema (one owner)

INDEX_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.string()),     # content hash, see format.chunk_id(); shared by identical chunks
        ("doc_id", pa.string()),
        ("chunk_no", pa.int32()),      # position of the chunk in its document; -1 for the shared prefix
        ("n_tokens", pa.int32()),
        ("shard", pa.string()),        # shard name without suffix
        ("pos_base", pa.int32()),      # absolute position of the chunk's first token when its KV was computed
        ("neighbours", pa.list_(pa.string())),  # chunk_ids prefilled before it (FusionRAG enrichment)
        ("checksum", pa.string()),     # xxh3_64 hex over kv, tok, sal bytes, computed by the writer
        ("char_start", pa.int64()),    # text span in the document
        ("char_end", pa.int64()),
        ("text", pa.string()),         # the chunk's text (retrieval reads it)
    ]
)
assert tuple(INDEX_SCHEMA.names) == fmt.INDEX_COLUMNS

# Keys a manifest must have for a reader to use it.
MANIFEST_KEYS = ("release", "format_version", "index", "model", "prefix")
DIGEST_SUFFIX = ".xxh3"          # releases/<release>.json.xxh3: digest of the manifest's bytes
HISTORY_FILE = "history.jsonl"   # one line per publish: {"release", "at"} (unix seconds)
SUMS_SUFFIX = ".sums.json"       # shards/<shard>.sums.json: what the writer wrote into the shard


@dataclass(frozen=True)
class ChunkRecord:
    """One index row: one (document, chunk number). Identical chunks share chunk_id and KV."""

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


@dataclass(frozen=True)
class Digest:
    """Size and xxh3-128 of a file's bytes."""

    bytes: int
    xxh3_128: str

    def as_dict(self) -> dict:
        return {"bytes": self.bytes, "xxh3_128": self.xxh3_128}

    @classmethod
    def of(cls, data: bytes | memoryview) -> "Digest":
        return cls(len(data), xxhash.xxh3_128(data).hexdigest())


def digest_file(path: Path) -> Digest:
    h, n = xxhash.xxh3_128(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            n += len(block)
    return Digest(n, h.hexdigest())


# ---------------------------------------------------------------- atomic writes

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, rename it to path and fsync the folder.

    Files are created with the process umask (0o666 & ~umask), so a cache folder
    that other users may read yields files they can read.
    """
    tmp = tmp_name(path)
    try:
        write(tmp)
        move_into_place(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def tmp_name(path: Path) -> Path:
    """The temporary name a writer uses for path (remove_stale_tmp deletes those a killed writer left)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def move_into_place(tmp: Path, path: Path) -> None:
    """fsync tmp, give it the umask's permissions, rename it to path, fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0o600 whatever the umask
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- index

def index_bytes(rows: list[dict]) -> bytes:
    """The parquet bytes of index rows (INDEX_SCHEMA)."""
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def shown_cache(cache_dir: str | Path) -> str:
    """The cache as the user named it, for advice: an object-storage cache's URL, not its local mirror."""
    from .fs import remote_of   # (fs imports this module)
    remote = remote_of(cache_dir)
    return remote.url if remote is not None else str(cache_dir)


def write_index(path: Path, rows: list[dict]) -> Digest:
    data = index_bytes(rows)
    write_bytes_atomic(path, data)
    return Digest.of(data)


def read_index(path: Path, expect: Digest | None) -> list[ChunkRecord]:
    """Index rows, in file order. With expect, the file's bytes must match it first."""
    advice = "The cache is damaged: run `kvfuse build-cache CORPUS --cache DIR` (it falls back to a release that verifies)."
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"index {path} is missing. {advice}") from None
    if expect is not None:
        got = Digest.of(data)
        if got.bytes != expect.bytes:
            raise StoreError(f"index {path} is {got.bytes} bytes, its manifest says {expect.bytes}. {advice}")
        if got.xxh3_128 != expect.xxh3_128:
            raise StoreError(f"index {path} does not match the digest in its manifest "
                             f"(changed after it was written: disk error or tampering). {advice}")
    try:
        # ParquetFile.read, not read_table: read_table's dataset machinery leaves threads that made
        # ~half of the processes that had torch loaded abort at exit (`terminate called without an
        # active exception`, exit status 134: `kvfuse gc`/`inspect` failed in scripts).
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    except Exception as e:
        raise StoreError(f"index {path} cannot be read: {e}. {advice}") from e
    missing = [c for c in fmt.INDEX_COLUMNS if c not in table.column_names]
    if missing:
        raise StoreError(f"index {path} has no column {missing[0]!r} (columns: {table.column_names}). {advice}")
    cols = table.to_pydict()
    cols["neighbours"] = [tuple(n or ()) for n in cols["neighbours"]]
    return [ChunkRecord(**{name: cols[name][i] for name in fmt.INDEX_COLUMNS}) for i in range(table.num_rows)]


def record_row(rec: ChunkRecord) -> dict:
    """An index row (dict of INDEX_SCHEMA) from a record."""
    return {name: (list(getattr(rec, name)) if name == "neighbours" else getattr(rec, name))
            for name in fmt.INDEX_COLUMNS}


def index_row(**fields) -> dict:
    """An index row from its fields, checked against INDEX_SCHEMA's columns (ValueError if not)."""
    if set(fields) != set(fmt.INDEX_COLUMNS):
        raise ValueError(f"index row fields {sorted(fields)} != columns {list(fmt.INDEX_COLUMNS)}")
    return {name: fields[name] for name in fmt.INDEX_COLUMNS}


# ---------------------------------------------------------------- shard headers and sums

def header_digest(blob: bytes | memoryview) -> str:
    """xxh3-128 of a safetensors file's header (8-byte length + JSON), from its bytes."""
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    return xxhash.xxh3_128(bytes(blob[: 8 + n])).hexdigest()


def shard_header_digest(path: Path) -> tuple[int, str]:
    """(file size, header digest) of a shard on disk; raises OSError/ValueError if unreadable."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"header length {n} runs past the end of the {size}-byte file")
        body = f.read(n)
    return size, xxhash.xxh3_128(head + body).hexdigest()


def sums_path(cache_dir: Path, shard: str) -> Path:
    return Path(cache_dir) / fmt.SHARDS_DIR / f"{shard}{SUMS_SUFFIX}"


def write_shard_sums(cache_dir: Path, shard: str, sums: dict) -> None:
    """sums: {"bytes", "header", "metadata", "chunks": {chunk_id: checksum}}, as the writer wrote them."""
    write_bytes_atomic(sums_path(cache_dir, shard), json.dumps(sums, sort_keys=True).encode())


def read_shard_sums(cache_dir: Path, shard: str) -> dict | None:
    """The writer's sums of a shard, or None when missing or unreadable (then nothing in it is trusted)."""
    try:
        sums = json.loads(sums_path(cache_dir, shard).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(sums, dict) and isinstance(sums.get("chunks"), dict) and "bytes" in sums and "header" in sums
    return sums if ok else None


# ---------------------------------------------------------------- manifest

def manifest_path(cache_dir: Path, release: str) -> Path:
    return Path(cache_dir) / fmt.RELEASES_DIR / f"{release}.json"


def write_manifest(cache_dir: Path, manifest: dict) -> Path:
    """Write releases/<release>.json and its digest sidecar (sidecar first)."""
    path = manifest_path(cache_dir, manifest["release"])
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    write_bytes_atomic(path.with_name(path.name + DIGEST_SUFFIX), (Digest.of(data).xxh3_128 + "\n").encode())
    write_bytes_atomic(path, data)
    return path


def read_manifest(cache_dir: Path, release: str) -> dict:
    """The manifest of release, checked: digest (when its sidecar exists), UTF-8, JSON, keys, format.

    Raises NoReleaseError (no such release), StoreError (damaged: the message names the file).
    A manifest without a sidecar and without "index_digest" was written by an older kvfuse
    and is read unchecked.
    """
    cache_dir = Path(cache_dir)
    if not fmt.is_safe_name(release):
        raise UnsafePathError(f"release name {release!r} is not a plain file name; refusing it.")
    path = manifest_path(cache_dir, release)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        known = ", ".join(list_releases(cache_dir)) or "none"
        raise NoReleaseError(f"unknown release {release!r} in {cache_dir} (releases: {known}).") from None
    advice = (f"The release is damaged: run `kvfuse build-cache CORPUS --cache {shown_cache(cache_dir)}` (it falls "
              "back to the newest release that verifies), or open another release with --release.")
    sidecar = path.with_name(path.name + DIGEST_SUFFIX)
    want = None
    if sidecar.exists():
        want = sidecar.read_bytes()
        if (Digest.of(data).xxh3_128 + "\n").encode() != want:  # exact: a flip in either file is found
            raise StoreError(f"release manifest {path} does not match its digest in {sidecar.name} "
                             f"(changed after it was written: disk error or tampering). {advice}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StoreError(f"release manifest {path} is not UTF-8 text (bad byte at offset {e.start}). {advice}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoreError(f"release manifest {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                         f"{e.msg}). {advice}") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"release manifest {path} holds a JSON {type(manifest).__name__}, not an object. {advice}")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise StoreError(f"release manifest {path} has no {missing[0]!r} key. {advice}")
    if want is None and "index_digest" in manifest:
        raise StoreError(f"release manifest {path} has lost its digest file {sidecar.name}. {advice}")
    version = manifest.get("format_version")
    if version not in fmt.READABLE_FORMATS:
        raise StoreError(
            f"release {release} has store format {version}; this kvfuse reads formats "
            f"{', '.join(map(str, fmt.READABLE_FORMATS))}. Rebuild the cache with this version."
        )
    if manifest["release"] != release:
        raise StoreError(f"release manifest {path} names release {manifest['release']!r}. {advice}")
    return manifest


def index_digest(manifest: dict) -> Digest | None:
    d = manifest.get("index_digest")
    return Digest(int(d["bytes"]), str(d["xxh3_128"])) if d else None


def list_releases(cache_dir: Path) -> list[str]:
    """Release ids with a manifest, oldest first (ids sort by their number)."""
    folder = Path(cache_dir) / fmt.RELEASES_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if fmt.is_safe_name(p.stem))


# ---------------------------------------------------------------- CURRENT and the publish history

def read_current(cache_dir: Path) -> str | None:
    """The release CURRENT names, None when there is no CURRENT. StoreError if it is garbage."""
    path = Path(cache_dir) / fmt.CURRENT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    release = data.decode("utf-8", "replace").strip()
    if not release:
        return None
    if not fmt.is_safe_name(release):
        raise StoreError(
            f"{path} holds {release[:60]!r}, not a release name: the file is damaged or was edited. "
            f"Run `kvfuse build-cache CORPUS --cache {shown_cache(cache_dir)}` (it falls back to the newest release that "
            f"verifies), or write one of {list_releases(cache_dir) or 'the releases'} into it."
        )
    return release


def write_current(cache_dir: Path, release: str) -> None:
    write_bytes_atomic(Path(cache_dir) / fmt.CURRENT_FILE, (release + "\n").encode())


def append_history(cache_dir: Path, release: str, at: float | None = None) -> None:
    """Record that release became current (append + fsync; a torn last line is skipped on read)."""
    line = json.dumps({"release": release, "at": time.time() if at is None else at}) + "\n"
    fd = os.open(Path(cache_dir) / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_history(cache_dir: Path) -> list[tuple[str, float]]:
    """(release, unix time it became current), oldest first; unreadable lines are skipped."""
    path = Path(cache_dir) / HISTORY_FILE
    try:
        lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
            release, at = entry["release"], float(entry["at"])
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(release, str) and fmt.is_safe_name(release):
            out.append((release, at))
    return out
