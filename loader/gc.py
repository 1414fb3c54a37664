"""`kvfuse gc --keep N`: delete releases beyond the newest N and the files no kept release uses.

    report = collect(cache_dir, keep=2)      # GcReport(releases=[...], shards=[...], embeddings=[...], bytes_freed)

Kept: the N newest releases (release ids sort by their number) and CURRENT.
Deleted: the manifests and indexes of the other releases, every shard and
embedding file that no kept release references (shards a killed build left
behind included), and temporary files of killed writers. It takes the cache's
writer lock, so it never races a build. A reader that still holds a deleted
release keeps the shards it already opened (they stay mapped) but can't open
others: keep N at least as large as the number of releases readers may hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from . import format as fmt
from .store import list_releases, read_current
from .writer import cache_lock, remove_stale_tmp

EMBEDDINGS_DIR = "embeddings"  # written by the pipeline's relate stage; a release lists its files


@dataclass
class GcReport:
    kept: list[str] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)    # deleted
    shards: list[str] = field(default_factory=list)      # deleted
    embeddings: list[str] = field(default_factory=list)  # deleted
    bytes_freed: int = 0


def collect(cache_dir: str | Path, keep: int, dry_run: bool = False) -> GcReport:
    cache_dir = Path(cache_dir)
    if keep < 1:
        raise ValueError(f"--keep must be at least 1 (got {keep}): the current release is always kept.")
    if not (cache_dir / fmt.RELEASES_DIR).is_dir():
        raise FileNotFoundError(f"{cache_dir} is not a kvfuse cache (no {fmt.RELEASES_DIR}/ folder).")
    report = GcReport()
    with cache_lock(cache_dir):
        releases = list_releases(cache_dir)
        current = read_current(cache_dir)
        kept = set(releases[-keep:]) | ({current} if current else set())
        report.kept = sorted(kept)
        shards_used, embeddings_used = set(), set()
        manifests = {}
        for release in releases:
            manifests[release] = json.loads((cache_dir / fmt.RELEASES_DIR / f"{release}.json").read_text())
        for release in report.kept:
            m = manifests[release]
            shards_used.update(pq.read_table(cache_dir / m["index"], columns=["shard"]).column("shard").to_pylist())
            embeddings_used.update(m.get("embeddings", []))

        def delete(path: Path, into: list[str]) -> None:
            if path.exists():
                into.append(path.name.removesuffix(fmt.SHARD_SUFFIX).removesuffix(".json"))
                report.bytes_freed += path.stat().st_size
                if not dry_run:
                    path.unlink()

        indexes: list[str] = []
        for release in releases:
            if release not in kept:  # manifest first: no reader can open a release whose index is gone
                delete(cache_dir / fmt.RELEASES_DIR / f"{release}.json", report.releases)
                delete(cache_dir / manifests[release]["index"], indexes)
        for path in sorted((cache_dir / fmt.SHARDS_DIR).glob(f"*{fmt.SHARD_SUFFIX}")):
            if path.name.removesuffix(fmt.SHARD_SUFFIX) not in shards_used:
                delete(path, report.shards)
        emb_dir = cache_dir / EMBEDDINGS_DIR
        for path in sorted(emb_dir.glob("*.parquet")) if emb_dir.is_dir() else ():
            if path.name not in embeddings_used:
                delete(path, report.embeddings)
        if not dry_run:
            remove_stale_tmp(cache_dir)
    return report
