"""kvfuse.runtime: serve time — model adapter, RoPE re-positioning, selectors, selective
recompute, and `FusionEngine`, the API a host server embeds.

    from kvfuse.runtime import FusionEngine, load_model

The names below load on first use (PEP 562), so importing a light submodule (the selectors,
the layout) does not import transformers and the engine (~4 s): the CLI checks its
arguments before that.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"EngineConfig": "engine", "FusionEngine": "engine", "FusedLayout": "layout", "LoadedModel": "model",
            "load_model": "model", "Answer": "requests", "FusionRequest": "requests", "RequestError": "requests",
            "RequestHandle": "requests"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
