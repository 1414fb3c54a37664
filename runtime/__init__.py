"""kvfuse.runtime: serve time — model adapter, RoPE re-positioning, selectors, selective
recompute, and `FusionEngine`, the API a host server embeds.

    from kvfuse.runtime import FusionEngine, load_model
"""

from .engine import Answer, FusionEngine
from .model import LoadedModel, load_model

__all__ = ["Answer", "FusionEngine", "LoadedModel", "load_model"]
