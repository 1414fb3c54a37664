"""kvfuse.runtime: serve time — model adapter, RoPE re-positioning, selectors, selective
recompute, and `FusionEngine`, the API a host server embeds.

    from kvfuse.runtime import FusionEngine, load_model
"""

from .engine import EngineConfig, FusionEngine
from .layout import FusedLayout
from .model import LoadedModel, load_model
from .requests import Answer, FusionRequest, RequestError, RequestHandle

__all__ = ["Answer", "EngineConfig", "FusedLayout", "FusionEngine", "FusionRequest", "LoadedModel",
           "RequestError", "RequestHandle", "load_model"]
