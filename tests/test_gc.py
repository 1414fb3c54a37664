"""`kvfuse gc --keep N`: old releases and unreferenced shards/embeddings go, kept releases stay whole."""

import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model_dir
from test_refresh import make_docs, write_docs

from kvfuse.loader import format as fmt
from kvfuse.loader.gc import collect
from kvfuse.loader.store import Store, list_releases
from kvfuse.loader.writer import ShardWriter
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.cli.main import main
from kvfuse.runtime.model import load_model


@pytest.fixture(scope="module")
def three_releases(tmp_path_factory):
    lm = load_model(str(tiny_model_dir(tmp_path_factory)))
    tmp = tmp_path_factory.mktemp("gc")
    cfg = BuildConfig(chunk_tokens=16, progress=False, neighbour_tokens=40, shard_bytes=1)  # a shard per chunk
    docs = make_docs()
    for i in range(3):
        docs[f"d{i}"] = f"the red city number {i} is the capital"
        build_cache(write_docs(tmp / "c.jsonl", docs), tmp / "cache", lm, cfg)
    return tmp / "cache"


def shards(cache):
    return {p.name.removesuffix(fmt.SHARD_SUFFIX) for p in (cache / fmt.SHARDS_DIR).iterdir()}


def test_gc_keeps_the_newest_releases_whole_and_deletes_the_rest(three_releases, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(three_releases, cache)
    r1, r2, r3 = list_releases(cache)
    orphan = ShardWriter(cache, {"model_fingerprint": "x"})
    orphan.add("orphan", torch.zeros(1, 2, 1, 1, 1), torch.zeros(1), torch.zeros(2, 1))
    orphan.flush()  # a shard a killed build left behind
    all_before = shards(cache)
    used = lambda rel: {r.shard for r in Store.open(cache, rel).records(include_prefix=True)}

    dry = collect(cache, keep=2, dry_run=True)
    assert dry.releases == [r1] and shards(cache) == all_before
    report = collect(cache, keep=2)
    assert report.kept == [r2, r3] and report.releases == [r1] and list_releases(cache) == [r2, r3]
    assert shards(cache) == used(r2) | used(r3) and orphan.written[0].shard in report.shards
    assert len(report.shards) > 1 and report.bytes_freed > 0  # r1's own chunks went too
    for rel in (r2, r3):
        store = Store.open(cache, rel)
        for rec in store.records():
            store.read(rec.chunk_id)
    emb = {p.name for p in (cache / "embeddings").iterdir()}
    assert emb == set(Store.open(cache, r2).manifest["embeddings"]) | set(Store.open(cache, r3).manifest["embeddings"])

    out = CliRunner().invoke(main, ["gc", str(cache), "--keep", "1"])
    assert out.exit_code == 0, out.output
    assert list_releases(cache) == [r3] and shards(cache) == used(r3)
    assert CliRunner().invoke(main, ["gc", str(cache), "--keep", "0"]).exit_code != 0
