"""Caches on object storage (issue 14.3): a real S3-compatible server on loopback (moto's server
mode), driven from the CLI: build -> ask -> refresh -> gc; a publisher killed mid-publish; two
publishers racing for CURRENT; a Dask cluster whose workers upload the shards."""

import json
import logging
import uuid

import pytest
from click.testing import CliRunner
from test_integrity_build import lm, model_dir  # noqa: F401  (the tiny model fixtures)
from test_refresh import make_docs, write_docs

from kvfuse.cli.main import main
from kvfuse.loader import format as fmt
from kvfuse.loader import fs as kvfs
from kvfuse.loader.gc import collect
from kvfuse.loader.store import Store, verify_release
from kvfuse.pipeline.build import BuildConfig, build_cache

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

# isolated chunks (no enrichment pass: the storage path is the same) and several shards per build
CFG = BuildConfig(chunk_tokens=16, progress=False, enrich=False, shard_bytes=1 << 14)


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server on 127.0.0.1 (a random port); credentials from the environment, as a user sets them."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(endpoint):
    """A fresh bucket per test; the store's storage options point at the server."""
    name = f"kv-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir(name)
    yield fs, name  # the store finds the server by AWS_ENDPOINT_URL (or --storage-options)
    kvfs._config.update(storage_options=None, local_cache=None)
    kvfs._mirrors.clear()


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    return result


def exists(fs, path: str) -> bool:
    fs.invalidate_cache()  # s3fs caches listings
    return fs.exists(path)


def current(fs, url: str) -> str:
    return fs.cat(f"{url.removeprefix('s3://')}/CURRENT").decode().strip()


def use_mirror(root) -> None:
    """Another machine: its own local shard cache (and so its own view of CURRENT)."""
    kvfs.configure(local_cache=root)


def test_build_ask_refresh_gc_cycle_on_s3_from_the_cli(tmp_path, bucket, endpoint, model_dir, monkeypatch):
    fs, name = bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # only --storage-options finds the server
    url = f"s3://{name}/kv"
    opts = ["--storage-options", json.dumps({"endpoint_url": endpoint})]
    docs = make_docs(n=3, words=40)
    corpus = write_docs(tmp_path / "c.jsonl", docs)
    build = ["build-cache", corpus, "--cache", url, "--in-process", "--model", model_dir, "--chunk-tokens", 16,
             "--no-enrich", "--shard-mb", 1, *opts]
    r = cli(*build, "--local-cache", tmp_path / "builder")
    assert r.exit_code == 0, r.output + repr(r.exception)
    first = current(fs, url)
    assert fs.ls(f"{name}/kv/shards") and fs.exists(f"{name}/kv/releases/{first}.json")

    # a reader on another machine: only the metadata and the shards it reads come down
    r = cli("inspect", url, "--json", *opts, "--local-cache", tmp_path / "reader")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert json.loads(r.output)["release"] == first
    reader_shards = tmp_path / "reader" / "s3" / name / "kv" / fmt.SHARDS_DIR
    assert not list(reader_shards.glob(f"*{fmt.SHARD_SUFFIX}"))
    r = cli("ask", url, "what is the capital", "--model", model_dir, "--max-new-tokens", 2, *opts,
            "--local-cache", tmp_path / "reader")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "answer:" in r.output and list(reader_shards.glob(f"*{fmt.SHARD_SUFFIX}"))

    # refresh: one document changed
    docs["d1"] = "the red cat is in the house and the dog is in the car " * 3
    write_docs(corpus, docs)
    r = cli(*build, "--local-cache", tmp_path / "builder")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "reused" in r.output
    second = current(fs, url)
    assert second != first
    r = cli("verify", url, *opts, "--local-cache", tmp_path / "reader")
    assert r.exit_code == 0 and f"release {second}: OK" in r.output, r.output

    # gc on the bucket: the first release goes, every shard the second uses stays
    r = cli("gc", url, "--keep", 1, "--grace", "0", *opts, "--local-cache", tmp_path / "reader")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "deleted 1 releases" in r.output and not exists(fs, f"{name}/kv/releases/{first}.json")
    kvfs._mirrors.clear()
    r = cli("verify", url, *opts, "--local-cache", tmp_path / "third")  # a fresh machine reads it all
    assert r.exit_code == 0 and f"release {second}: OK" in r.output, r.output


@pytest.mark.parametrize("dies_at", ["index", "CURRENT"])
def test_a_publisher_killed_mid_publish_leaves_the_previous_release_readable(tmp_path, bucket, lm, monkeypatch,
                                                                             dies_at):
    fs, name = bucket
    url = f"s3://{name}/kv"
    use_mirror(tmp_path / "a")
    docs = make_docs(n=3, words=40)
    first = build_cache(write_docs(tmp_path / "c.jsonl", docs), url, lm, CFG).release
    shards = f"{name}/kv/{fmt.SHARDS_DIR}"
    before = set(fs.ls(shards, refresh=True))

    class Killed(BaseException):  # like SIGKILL: nothing after it runs, no except clause catches it
        pass

    put, swap = kvfs.Remote.put, kvfs.Remote.swap_current

    def dying_put(self, rel, src, create_only=False):
        if dies_at == "index" and rel.startswith(fmt.INDEX_DIR):
            raise Killed
        return put(self, rel, src, create_only)

    def dying_swap(self, release):
        raise Killed

    monkeypatch.setattr(kvfs.Remote, "put", dying_put)
    monkeypatch.setattr(kvfs.Remote, "swap_current", dying_swap)
    docs["d0"] = "the blue bird is on the tree by the water " * 3
    with pytest.raises(Killed):
        build_cache(write_docs(tmp_path / "c.jsonl", docs), url, lm, CFG)
    orphans = set(fs.ls(shards, refresh=True)) - before
    assert orphans                     # its new shards were uploaded ...
    assert current(fs, url) == first   # ... but CURRENT never moved
    monkeypatch.setattr(kvfs.Remote, "put", put)
    monkeypatch.setattr(kvfs.Remote, "swap_current", swap)

    use_mirror(tmp_path / "fresh")  # another machine reads the previous release, whole
    report = verify_release(url)
    assert report.ok and report.release == first and report.chunks > 1
    young = collect(url, keep=1)  # default grace: unreferenced shards may be a publish in flight
    assert not young.shards and orphans <= set(fs.ls(shards, refresh=True))
    assert collect(url, keep=1, grace_s=0).shards and not orphans & set(fs.ls(shards, refresh=True))
    assert verify_release(url).ok
    use_mirror(tmp_path / "a")      # a rerun on the killed machine publishes, recomputing what gc took
    again = build_cache(write_docs(tmp_path / "c.jsonl", docs), url, lm, CFG)
    assert current(fs, url) == again.release != first
    use_mirror(tmp_path / "fresh")
    assert verify_release(url).ok


def test_two_concurrent_publishers_exactly_one_wins(tmp_path, bucket, lm, monkeypatch):
    fs, name = bucket
    url = f"s3://{name}/kv"
    use_mirror(tmp_path / "a")
    docs = make_docs(n=3, words=40)
    first = build_cache(write_docs(tmp_path / "c.jsonl", docs), url, lm, CFG).release
    swap, raced = kvfs.Remote.swap_current, {}

    def racing_swap(self, release):
        """Publisher A is about to swap CURRENT; B (another machine, same base release) publishes first."""
        if not raced:
            raced["a"] = release
            use_mirror(tmp_path / "b")
            docs_b = {**docs, "d2": "the green tree is by the river " * 4}
            raced["b"] = build_cache(write_docs(tmp_path / "b.jsonl", docs_b), url, lm, CFG).release
            use_mirror(tmp_path / "a")
        return swap(self, release)

    monkeypatch.setattr(kvfs.Remote, "swap_current", racing_swap)
    docs["d3"] = "the black car is at the door of the house " * 3
    with pytest.raises(kvfs.PublishConflict, match="another publisher replaced CURRENT"):
        build_cache(write_docs(tmp_path / "c.jsonl", docs), url, lm, CFG)
    assert raced["a"] != raced["b"] != first
    assert current(fs, url) == raced["b"]
    assert not exists(fs, f"{name}/kv/releases/{raced['a']}.json")  # the loser's release is not listed
    first_shards = {r.shard for r in Store.open(tmp_path / "a" / "s3" / name / "kv", first, lease=False)
                    .records(include_prefix=True)}
    b_shards = tmp_path / "b" / "s3" / name / "kv" / fmt.SHARDS_DIR  # B refreshed on a fresh machine:
    assert not {p.name.removesuffix(fmt.SHARD_SUFFIX) for p in b_shards.glob(f"*{fmt.SHARD_SUFFIX}")} & first_shards
    use_mirror(tmp_path / "fresh")  # it checked the shards it reused by range reads, downloading none
    for release in (first, raced["b"]):  # nothing lost: both published releases read back whole
        report = verify_release(url, release)
        assert report.ok and report.chunks > 1, report.problems


SEEN_BY_WORKERS: list = []  # module level: the in-process workers append to this very list


def _spy_worker_dir(where):
    SEEN_BY_WORKERS.append(where)
    return kvfs.worker_dir(where)


def test_dask_workers_write_shards_to_the_object_store(tmp_path, bucket, model_dir, monkeypatch):
    from distributed import Client, LocalCluster

    from kvfuse.pipeline import dask_job

    fs, name = bucket
    url = f"s3://{name}/dask"
    use_mirror(tmp_path / "driver")
    seen = SEEN_BY_WORKERS
    seen.clear()
    monkeypatch.setattr(dask_job, "worker_dir", _spy_worker_dir)
    corpus = write_docs(tmp_path / "c.jsonl", make_docs(n=3, words=40))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as lc, \
            Client(lc) as client:
        report = dask_job.build_on_dask(client, corpus, url, dask_job.ModelLoader(str(model_dir)), CFG,
                                        dask_job.ClusterConfig(workers=2, task_tokens=150))
    assert seen and all(isinstance(w, tuple) and w[0] == url for w in seen)  # workers got the URL, not a path
    assert current(fs, url) == report.release and len(fs.ls(f"{name}/dask/shards")) >= 2
    use_mirror(tmp_path / "reader")
    store = Store.open(url, lease=False)
    assert len(store) == report.chunks + 1 and verify_release(url).ok


def test_a_shard_name_taken_by_other_bytes_is_never_overwritten(tmp_path, bucket):
    from kvfuse.loader.writer import _upload_shard

    fs, name = bucket
    use_mirror(tmp_path / "m")
    remote = kvfs.Remote.of(f"s3://{name}/kv")
    ours = tmp_path / "shard"
    ours.write_bytes(b"ours")
    fs.pipe(f"{name}/kv/shards/s-1.safetensors", b"theirs")  # another publisher's shard, same name
    got = _upload_shard(remote, ours, "s-1", {"bytes": 4, "chunks": {"c": "1"}})
    assert got.startswith("s-1-") and fs.cat(f"{name}/kv/shards/s-1.safetensors") == b"theirs"
    assert fs.cat(f"{name}/kv/shards/{got}.safetensors") == b"ours"
    assert json.loads(fs.cat(f"{name}/kv/shards/{got}.sums.json")) == {"bytes": 4, "chunks": {"c": "1"}}
    # the same bytes already there (same sums): reused under their name, nothing uploaded
    assert _upload_shard(remote, ours, got, {"bytes": 4, "chunks": {"c": "1"}}) == got


def test_the_engine_hot_reloads_a_release_published_from_another_machine(tmp_path, bucket, lm):
    from kvfuse.runtime.engine import EngineConfig, FusionEngine

    fs, name = bucket
    url = f"s3://{name}/kv"
    docs = make_docs(n=3, words=40)
    use_mirror(tmp_path / "builder")
    first = build_cache(write_docs(tmp_path / "c.jsonl", docs), url, lm, CFG).release
    use_mirror(tmp_path / "server")
    engine = FusionEngine(url, lm, config=EngineConfig(reload_interval_s=0))
    try:
        assert engine.release == first
        docs["fresh"] = "tokyo is the capital of japan"
        use_mirror(tmp_path / "builder")
        second = build_cache(write_docs(tmp_path / "c.jsonl", docs), url, lm, CFG).release
        use_mirror(tmp_path / "server")
        after = engine.ask("tokyo japan", top_k=1, max_new_tokens=2)
        assert after.release == second == engine.release and after.doc_ids == ["fresh"]
    finally:
        engine.close()
