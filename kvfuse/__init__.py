"""kvfuse: precomputed chunk KV caches for RAG, fused at serve time with query-driven selective recompute.

    from kvfuse import FusionEngine, FusionRequest, load_model
    engine = FusionEngine("cache/", load_model("smollm2-135m"))
    print(engine.ask("Who painted La Grande Jatte?").text)

The subpackages, top of the import stack first: `kvfuse.cli` -> `kvfuse.bench` ->
`kvfuse.pipeline` (offline build) -> `kvfuse.runtime` (serve time) -> `kvfuse.loader` (the store).
Names here are loaded lazily, so `import kvfuse.loader` does not pull in torch models.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FusionEngine": "kvfuse.runtime",
    "FusionRequest": "kvfuse.runtime",
    "Answer": "kvfuse.runtime",
    "EngineConfig": "kvfuse.runtime",
    "RequestError": "kvfuse.runtime",
    "RequestHandle": "kvfuse.runtime",
    "load_model": "kvfuse.runtime",
    "Store": "kvfuse.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvfuse' has no attribute {name!r}")
