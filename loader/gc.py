"""`kvfuse gc --keep N`: delete old releases and the files no kept release uses.

    report = collect(cache_dir, keep=2)      # GcReport(kept=[...], releases=[...], shards=[...], ...)

Kept, by the publish history (`history.jsonl`: what was current, when) and never
by which files happen to exist:
  - CURRENT's release and the N releases most recently current;
  - every release current (or, if never current, created) less than `grace_s` ago,
    so a reader that opened it just before a publish keeps reading (default 6 h);
  - every release a live reader registered (a lease under `leases/`, see
    `Store.open`): on this host while the reader's process lives, from another
    host while the lease was refreshed in the last LEASE_TTL_S; stale leases are
    deleted.
A release a killed build left un-published (never current) is collected once
past the grace period. Deleted: the manifests (and digest files) and indexes of
the other releases, every shard (and its sums file) and embedding file no kept
release references, and temporary files of killed writers. It takes the cache's
writer lock, so it never races a build; `dry_run` only reads (read-only caches too).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import format as fmt
from .errors import StoreError
from .fs import EMBEDDINGS_DIR, Remote, local_dir, remote_of
from .manifest import DIGEST_SUFFIX, SUMS_SUFFIX, list_releases, read_current, read_history, read_manifest
from .store import LEASE_TTL_S, LEASES_DIR, Store
from .writer import cache_lock, remove_stale_tmp

# EMBEDDINGS_DIR ("embeddings"): written by the pipeline's relate stage; a release lists its files
DEFAULT_GRACE_S = 6 * 3600.0


@dataclass
class GcReport:
    kept: list[str] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)    # deleted
    shards: list[str] = field(default_factory=list)      # deleted
    embeddings: list[str] = field(default_factory=list)  # deleted
    bytes_freed: int = 0
    reasons: dict[str, str] = field(default_factory=dict)  # kept release -> why


def parse_duration(text: str | float) -> float:
    """Seconds from "90", "90s", "30m", "6h", "2d"."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ValueError(f"grace {text!r} is not a duration like 90s, 30m, 6h or 2d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def live_leases(cache_dir: Path, now: float, remove_stale: bool) -> dict[str, int]:
    """release -> number of live reader leases; stale ones are deleted when remove_stale."""
    live: dict[str, int] = {}
    folder = Path(cache_dir) / LEASES_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            lease = json.loads(path.read_text())
            if lease.get("host") == socket.gethostname():  # this host: live while its process is
                fresh = _alive(int(lease["pid"]))
            else:  # another host: live while refreshed
                fresh = now - path.stat().st_mtime < LEASE_TTL_S
            release = str(lease["release"])
        except (OSError, ValueError, KeyError, TypeError):
            fresh, release = False, ""
        if fresh:
            live[release] = live.get(release, 0) + 1
        elif remove_stale:
            path.unlink(missing_ok=True)
    return live


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kept(cache_dir: Path, releases: list[str], keep: int, grace_s: float, now: float,
          leases: dict[str, int]) -> dict[str, str]:
    """release -> why it is kept."""
    reasons: dict[str, str] = {}
    try:
        current = read_current(cache_dir)
    except StoreError:
        current = None
    history = [(r, t) for r, t in read_history(cache_dir) if r in releases]
    # when each release stopped being current (None: still current)
    until: dict[str, float | None] = {}
    for i, (release, _) in enumerate(history):
        until[release] = history[i + 1][1] if i + 1 < len(history) else None
    if current in releases:
        reasons[current] = "current"
        until[current] = None
    recent = list(dict.fromkeys(r for r, _ in reversed(history)))
    for release in recent[:keep]:
        reasons.setdefault(release, f"among the {keep} most recently current")
    for release in releases:
        if release in until:
            last = until[release]
            if last is not None and now - last < grace_s:
                reasons.setdefault(release, f"current until {now - last:.0f} s ago (grace {grace_s:.0f} s)")
        else:  # never current (a crashed publish): its age is its manifest's
            age = now - (Path(cache_dir) / fmt.RELEASES_DIR / f"{release}.json").stat().st_mtime
            if age < grace_s:
                reasons.setdefault(release, f"created {age:.0f} s ago, never current (grace {grace_s:.0f} s)")
        if leases.get(release):
            reasons.setdefault(release, f"held by {leases[release]} live reader(s)")
    if not history and current is None and releases:  # no history, no CURRENT: keep the newest by id
        for release in releases[-keep:]:
            reasons.setdefault(release, "newest (no publish history)")
    return reasons


def collect(cache_dir: str | Path, keep: int, dry_run: bool = False, grace_s: float = DEFAULT_GRACE_S) -> GcReport:
    """Delete what no kept release needs; see the module docstring. Returns what was (or, with
    dry_run, would be) deleted. Raises ValueError (keep < 1), FileNotFoundError (not a cache)."""
    cache_dir = local_dir(cache_dir)  # a URL: its mirror, metadata pulled; deletions go to the bucket
    if keep < 1:
        raise ValueError(f"--keep must be at least 1 (got {keep}): the current release is always kept.")
    if not (cache_dir / fmt.RELEASES_DIR).is_dir():
        raise FileNotFoundError(f"{cache_dir} is not a kvfuse cache (no {fmt.RELEASES_DIR}/ folder).")
    report = GcReport()
    with cache_lock(cache_dir, dry_run=dry_run):
        now = time.time()
        releases = list_releases(cache_dir)
        reasons = _kept(cache_dir, releases, keep, grace_s, now, live_leases(cache_dir, now, not dry_run))
        report.kept, report.reasons = sorted(reasons), reasons
        shards_used, embeddings_used, indexes_used = set(), set(), set()
        for release in report.kept:
            try:
                with Store.open(cache_dir, release, lease=False) as store:
                    shards_used.update(r.shard for r in store.records(include_prefix=True))
                    embeddings_used.update(store.manifest.get("embeddings", []))
                    indexes_used.add(store.manifest["index"])
            except StoreError as e:
                raise StoreError(f"kept release {release} cannot be read, so gc cannot tell which files it "
                                 f"needs; nothing was deleted. {e}") from e

        if (remote := remote_of(cache_dir)) is not None:
            _collect_remote(remote, report, releases, reasons, shards_used, embeddings_used, indexes_used,
                            grace_s, now, dry_run)
            return report

        def delete(path: Path, into: list[str] | None) -> None:
            if path.exists():
                if into is not None:
                    into.append(path.name.removesuffix(fmt.SHARD_SUFFIX).removesuffix(".json"))
                report.bytes_freed += path.stat().st_size
                if not dry_run:
                    path.unlink()

        for release in releases:
            if release in reasons:
                continue
            manifest_file = cache_dir / fmt.RELEASES_DIR / f"{release}.json"
            try:
                index = read_manifest(cache_dir, release)["index"]
            except StoreError:
                index = f"{fmt.INDEX_DIR}/{release}.parquet"  # a damaged manifest: its index by name
            # manifest first: no reader can open a release whose index is gone
            delete(manifest_file, report.releases)
            delete(manifest_file.with_name(manifest_file.name + DIGEST_SUFFIX), None)
            if index not in indexes_used and fmt.is_safe_name(Path(index).name):
                delete(cache_dir / fmt.INDEX_DIR / Path(index).name, None)
        for path in sorted((cache_dir / fmt.SHARDS_DIR).glob(f"*{fmt.SHARD_SUFFIX}")):
            shard = path.name.removesuffix(fmt.SHARD_SUFFIX)
            if shard not in shards_used:
                delete(path, report.shards)
                delete(path.with_name(shard + SUMS_SUFFIX), None)
        for path in sorted((cache_dir / fmt.SHARDS_DIR).glob(f"*{SUMS_SUFFIX}")):  # sums of a shard gone
            shard = path.name.removesuffix(SUMS_SUFFIX)
            if shard not in shards_used and not path.with_name(shard + fmt.SHARD_SUFFIX).exists():
                delete(path, None)
        emb_dir = cache_dir / EMBEDDINGS_DIR
        for path in sorted(emb_dir.glob("*.parquet")) if emb_dir.is_dir() else ():
            if path.name not in embeddings_used:
                delete(path, report.embeddings)
        if not dry_run:
            remove_stale_tmp(cache_dir)
    return report


def _collect_remote(remote: Remote, report: GcReport, releases: list[str], reasons: dict, shards_used: set,
                    embeddings_used: set, indexes_used: set, grace_s: float, now: float, dry_run: bool) -> None:
    """gc of a cache on object storage, from one listing of the bucket. Other hosts' readers hold no
    lease here, and a publisher holds no lock: unreferenced shards and embedding files younger than
    grace_s (an upload in flight) are kept, as are releases never current and younger than that."""
    objs = remote.listing()
    doomed: list[str] = []

    def delete(rel: str, into: list[str] | None, name: str) -> None:
        if rel in objs:
            doomed.append(rel)
            report.bytes_freed += objs[rel].size
            if into is not None:
                into.append(name)

    for release in releases:
        if release in reasons:
            continue
        rel = f"{fmt.RELEASES_DIR}/{release}.json"
        try:
            index = read_manifest(remote.local, release)["index"]
        except StoreError:
            index = f"{fmt.INDEX_DIR}/{release}.parquet"
        delete(rel, report.releases, release)  # manifest first: no reader opens a release whose index is gone
        delete(rel + DIGEST_SUFFIX, None, "")
        if index not in indexes_used and fmt.is_safe_name(Path(index).name):
            delete(f"{fmt.INDEX_DIR}/{Path(index).name}", None, "")
    old = {rel for rel, obj in objs.items() if now - obj.mtime >= grace_s}
    for rel in sorted(objs):
        folder, _, name = rel.partition("/")
        if folder == fmt.SHARDS_DIR and name.endswith(fmt.SHARD_SUFFIX):
            shard = name.removesuffix(fmt.SHARD_SUFFIX)
            if shard not in shards_used and rel in old:
                delete(rel, report.shards, shard)
                delete(f"{fmt.SHARDS_DIR}/{shard}{SUMS_SUFFIX}", None, "")
        elif folder == fmt.SHARDS_DIR and name.endswith(SUMS_SUFFIX):  # sums of a shard gone
            shard = name.removesuffix(SUMS_SUFFIX)
            if shard not in shards_used and rel in old and f"{fmt.SHARDS_DIR}/{shard}{fmt.SHARD_SUFFIX}" not in objs:
                delete(rel, None, "")
        elif folder == EMBEDDINGS_DIR and name.endswith(".parquet") and name not in embeddings_used and rel in old:
            delete(rel, report.embeddings, name)
    if not dry_run:
        remote.remove(list(dict.fromkeys(doomed)))
