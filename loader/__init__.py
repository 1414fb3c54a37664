"""kvfuse.loader: the store (format, reading a release, crash-safe writing, gc) and the serve-time
tiers (pinned host pool, GPU pool, queue-driven prefetch).

Imports neither `kvfuse.runtime` nor `kvfuse.pipeline`.
"""

from .errors import StoreError
from .store import ChunkData, ChunkRecord, Store, VerifyReport, verify_release

__all__ = ["ChunkData", "ChunkRecord", "Store", "StoreError", "VerifyReport", "verify_release"]
