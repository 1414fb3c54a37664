"""Errors of the store. Each message says what is wrong and what to do about it."""


class StoreError(Exception):
    """Base class: anything wrong with a cache folder."""


class NoReleaseError(StoreError):
    """The cache folder has no (readable) release, or the asked-for release doesn't exist."""


class UnknownChunkError(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else "unknown chunk"


class CorruptShardError(StoreError):
    """A shard is missing, truncated, or its bytes don't match the index checksum."""


class ModelMismatchError(StoreError):
    """The cache was built with another model (or dtype) than the one asked to read it."""


class UnsafePathError(StoreError):
    """A manifest or index names a file outside the cache folder."""
