"""kvfuse.serve: the OpenAI-compatible HTTP server over `FusionEngine` (FastAPI + uvicorn).

    from kvfuse.serve import create_app, router
    app = create_app(engine, api_key=None)        # uvicorn.run(app, host="127.0.0.1")
    host_app.include_router(router(engine))       # or next to a host's own routes

Imports only kvfuse.runtime / kvfuse.loader (the stack: cli -> bench -> serve -> pipeline -> runtime -> loader).
"""

from .app import ServeConfig, create_app, router
from .errors import APIError

__all__ = ["APIError", "ServeConfig", "create_app", "router"]
