"""CLI options shared by the commands that open a cache: a folder or an object-storage URL."""

from __future__ import annotations

import json
import os
import shlex

import click


class CachePath(click.Path):
    """A cache folder (checked like click.Path), or an fsspec URL such as s3://bucket/prefix (not
    checked here: the store says what is wrong with it)."""

    def convert(self, value, param, ctx):
        text = str(value)
        if "://" in text and not text.startswith("file://"):  # = kvfuse.loader.fs.is_url
            return text
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as e:
            if self.exists and not os.path.exists(text):   # say how to make one, not only that it is missing
                self.fail(f"{e.message.rstrip('.')}; build a cache there with "
                          f"`kvfuse build-cache CORPUS --cache {shlex.quote(text)}`", param, ctx)
            raise


def _set_storage_options(ctx, param, value):
    if value is None:
        return
    try:
        opts = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON ({e.msg}); give e.g. '{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'")
    if not isinstance(opts, dict):
        raise click.BadParameter("give a JSON object of fsspec/s3fs options")
    from kvfuse.loader.fs import configure
    configure(storage_options=opts)


def _set_local_cache(ctx, param, value):
    if value is not None:
        from kvfuse.loader.fs import configure
        configure(local_cache=value)


def storage_options(f):
    """Add --storage-options JSON and --local-cache DIR (they configure kvfuse.loader.fs)."""
    f = click.option("--local-cache", default=None, type=click.Path(file_okay=False), expose_value=False,
                     callback=_set_local_cache, envvar="KVFUSE_LOCAL_CACHE",
                     help="Object-storage caches: local folder for their metadata and downloaded shards "
                          "(default ~/.cache/kvfuse/remote).")(f)
    return click.option("--storage-options", default=None, expose_value=False, callback=_set_storage_options,
                        envvar="KVFUSE_STORAGE_OPTIONS", metavar="JSON",
                        help="Object-storage caches: fsspec/s3fs options, e.g. '{\"endpoint_url\": "
                             "\"http://127.0.0.1:9000\"}' (default: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).")(f)
