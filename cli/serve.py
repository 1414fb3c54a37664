"""`kvfuse serve`: the OpenAI-compatible HTTP server (kvfuse.serve) under uvicorn."""

from __future__ import annotations

import signal

import click

from kvfuse.cli.options import DTYPES
from kvfuse.cli.storage import CachePath, storage_options


@click.command("serve")
@click.argument("cache_dir", type=CachePath(exists=True, file_okay=False))
@storage_options
@click.option("--model", default="smollm2-135m", show_default=True, help="The model the cache was built with.")
@click.option("--dtype", default=None, type=DTYPES, help="Model/KV dtype (default float32 on CPU, bfloat16 on GPU).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; loopback unless you mean to expose it (then set --api-key).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="KVFUSE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (also $KVFUSE_API_KEY).")
@click.option("--max-body-kb", default=1024, show_default=True, type=click.IntRange(1),
              help="Larger request bodies get 413.")
@click.option("--max-tokens", "default_max_tokens", default=128, show_default=True, type=click.IntRange(1),
              help="max_tokens of a request that gives none.")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads (default: torch's choice).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve_cmd(cache_dir, model, dtype, host, port, api_key, max_body_kb, default_max_tokens, threads, log_level):
    """Serve CACHE_DIR over HTTP: OpenAI-compatible /v1/chat/completions and /v1/completions
    (kvfuse options in the body's "kvfuse" object), /v1/models, /healthz, /metrics. Ctrl-C stops
    taking connections, lets in-flight requests finish, then closes the engine."""
    from kvfuse.cli.main import _check_cache, _check_model, _load
    _check_model(model)       # these two before torch and the model load (seconds)
    _check_cache(cache_dir, model)

    import torch
    import uvicorn

    from kvfuse.runtime import FusionEngine
    from kvfuse.serve import ServeConfig, create_app

    if threads:
        torch.set_num_threads(threads)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    engine = FusionEngine(cache_dir, _load(model, dtype))
    config = ServeConfig(api_key=api_key, max_body_bytes=max_body_kb << 10, default_max_tokens=default_max_tokens)
    app = create_app(engine, config=config)
    click.echo(f"serving {engine.model_name} release {engine.release} on http://{host}:{port}/v1", err=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    # uvicorn handles SIGINT/SIGTERM while it runs (stop accepting, let open connections finish) and
    # raises the signal again once done; these no-ops receive that, so the engine closes and we exit 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()       # returns after SIGINT/SIGTERM once open connections have finished
    finally:
        engine.close()     # queued and running requests finish, then the loader is released
    click.echo("stopped", err=True)
