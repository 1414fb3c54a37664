"""kvfuse: precomputed chunk KV caches for RAG, fused at serve time with query-driven selective recompute.

    from kvfuse import FusionEngine, FusionRequest, load_model
    engine = FusionEngine("cache/", load_model("smollm2-135m"))
    print(engine.ask("Who painted A Sunday Afternoon on the Island of La Grande Jatte?").text)

The subpackages, top of the import stack first: `kvfuse.cli` -> `kvfuse.bench` -> `kvfuse.serve`
(HTTP server) -> `kvfuse.pipeline` (offline build) -> `kvfuse.runtime` (serve time) -> `kvfuse.loader` (the store).
Names here are loaded lazily, so `import kvfuse.loader` does not pull in torch models.
"""

from __future__ import annotations

import importlib
import os

# The subpackages live in the repository's top-level folders (pyproject's package-dir). From a
# checkout that is not the installed one, find them beside this folder rather than through the
# installed copy's import hook.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_root, "loader", "format.py")) and not os.path.isdir(os.path.join(__path__[0], "loader")):
    __path__.append(_root)

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
