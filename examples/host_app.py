"""A host FastAPI app that mounts kvfuse's OpenAI-compatible routes next to its own.

    python examples/host_app.py CACHE_DIR [--model smollm2-135m] [--port 8080]
    curl http://127.0.0.1:8080/                      # the host's own route
    curl http://127.0.0.1:8080/search?q=Seurat       # the host's route using the same engine
    curl http://127.0.0.1:8080/kvfuse/v1/chat/completions -H 'content-type: application/json' \
         -d '{"messages": [{"role": "user", "content": "Who painted A Sunday Afternoon on the Island of La Grande Jatte?"}]}'

The OpenAI client talks to it with base_url="http://127.0.0.1:8080/kvfuse/v1". The host owns
the engine: it opens it at startup and closes it (in-flight requests finish) at shutdown.
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kvfuse.runtime import FusionEngine, load_model
from kvfuse.serve import router


def build_app(engine: FusionEngine, close_engine: bool = False) -> FastAPI:
    """The host's app: its own routes, plus kvfuse's under /kvfuse (chat, completions, models,
    healthz, metrics). close_engine: close the engine when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_engine:
            engine.close()

    app = FastAPI(title="host app", lifespan=lifespan)

    @app.get("/")
    async def home():
        return {"app": "host", "kvfuse": "/kvfuse/v1", "release": engine.release}

    @app.get("/search")
    async def search(q: str, k: int = 3):
        """The host's own feature on the same engine: which documents kvfuse would read for q."""
        ids = engine.retrieve(q, k)
        docs = {r.chunk_id: r.doc_id for r in engine.records}
        return {"query": q, "chunks": [{"chunk_id": c, "doc_id": docs[c]} for c in ids]}

    app.include_router(router(engine), prefix="/kvfuse")
    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="A host app embedding kvfuse's routes.")
    p.add_argument("cache_dir")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args()
    engine = FusionEngine(args.cache_dir, load_model(args.model))
    uvicorn.run(build_app(engine, close_engine=True), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
