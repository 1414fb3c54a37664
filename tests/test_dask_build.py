"""The build as a real Dask job (LocalCluster, worker processes): same release as in-process,
and a worker or the driver killed mid-job, then a rerun, gives the release of an uninterrupted build;
the isolated pass kept from the embedding pass changes no byte."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import cloudpickle
import pytest
import torch
from conftest import tiny_model_dir
from test_refresh import make_docs, write_docs

from kvfuse.loader import format as fmt
from kvfuse.loader.store import Store, read_current
from kvfuse.pipeline.build import BuildConfig, build_cache
from kvfuse.pipeline import dask_job
from kvfuse.pipeline.dask_job import ClusterConfig, ModelLoader, build_on_dask, open_client
from kvfuse.runtime.model import load_model

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
CFG = BuildConfig(chunk_tokens=16, progress=False, neighbour_tokens=40, shard_bytes=1)  # a shard per chunk
CLUSTER = ClusterConfig(workers=2, task_tokens=150, retries=3)  # many small tasks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def client():
    with open_client(CLUSTER) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir):
    """An uninterrupted in-process build of the corpus."""
    tmp = tmp_path_factory.mktemp("ref")
    corpus = write_docs(tmp / "c.jsonl", make_docs(n=8))
    report = build_cache(corpus, tmp / "cache", load_model(str(model_dir)), CFG)
    return corpus, Store.open(tmp / "cache"), report


def assert_same_release(got: Store, want: Store) -> None:
    assert [r.chunk_id for r in got.records()] == [r.chunk_id for r in want.records()]
    for rec in want.records(include_prefix=True):
        a, b = got.read(rec.chunk_id), want.read(rec.chunk_id)
        assert got.record(rec.chunk_id).checksum == rec.checksum
        assert torch.equal(a.kv.view(torch.uint8), b.kv.view(torch.uint8)) and torch.equal(a.saliency, b.saliency)


def test_dask_build_equals_in_process_build_and_reruns_compute_nothing(tmp_path, client, model_dir, reference):
    corpus, want, ref = reference
    report = build_on_dask(client, corpus, tmp_path / "cache", ModelLoader(str(model_dir)), CFG, CLUSTER)
    assert report.computed == ref.computed and len(list((tmp_path / "cache" / fmt.SHARDS_DIR).iterdir())) > 2
    assert_same_release(Store.open(tmp_path / "cache"), want)
    again = build_on_dask(client, corpus, tmp_path / "cache", ModelLoader(str(model_dir)), CFG, CLUSTER)
    assert again.computed == 0 and again.reused == ref.chunks


@dataclass(frozen=True)
class KillOnceLoader:
    """Loads the model; the worker that runs the `after`-th forward pass first SIGKILLs itself
    (once per marker file): a worker dying mid-task."""

    path: str
    marker: str
    after: int

    def __call__(self, device):
        lm = load_model(self.path, device=device)
        forward, calls = lm.model.model.forward, [0]

        def dying_forward(*args, **kwargs):
            calls[0] += 1
            if calls[0] == self.after and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(*args, **kwargs)

        lm.model.model.forward = dying_forward
        return lm


def test_worker_killed_mid_job_still_gives_the_uninterrupted_release(tmp_path, client, model_dir, reference):
    corpus, want, _ = reference
    marker = tmp_path / "killed"
    loader = KillOnceLoader(str(model_dir), str(marker), after=30)  # past context + embedding, mid-prefill
    report = build_on_dask(client, corpus, tmp_path / "cache", loader, CFG, CLUSTER)
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert report.chunks == want.stats()["chunks"]
    assert_same_release(Store.open(tmp_path / "cache"), want)


DRIVER = """
import sys, time
from kvfuse.pipeline.build import BuildConfig
from kvfuse.pipeline.dask_job import ClusterConfig, build_on_dask, open_client
from kvfuse.runtime.model import load_model

class SlowLoader:  # pickled by value (defined in __main__): every forward pass takes 200 ms longer
    def __init__(self, path): self.path = path
    def __call__(self, device):
        lm = load_model(self.path, device=device)
        forward = lm.model.model.forward
        def slow(*a, **k):
            time.sleep(0.2)
            return forward(*a, **k)
        lm.model.model.forward = slow
        return lm

if __name__ == "__main__":
    cfg = BuildConfig(chunk_tokens=16, progress=False, neighbour_tokens=40, shard_bytes=1)
    cluster = ClusterConfig(workers=1, task_tokens=150)
    with open_client(cluster) as client:
        build_on_dask(client, sys.argv[2], sys.argv[3], SlowLoader(sys.argv[1]), cfg, cluster)
"""


def test_driver_killed_mid_job_then_rerun_gives_the_uninterrupted_release(tmp_path, client, model_dir, reference):
    corpus, want, ref = reference
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(model_dir), str(corpus), str(cache)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard_dir = cache / fmt.SHARDS_DIR
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if shard_dir.is_dir() and len(list(shard_dir.glob(f"*{fmt.SHARD_SUFFIX}"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the driver finished (or died) before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its LocalCluster and its workers, mid-job
    proc.wait()
    assert read_current(cache) is None  # nothing was published
    done = len(list(shard_dir.glob(f"*{fmt.SHARD_SUFFIX}")))
    report = build_on_dask(client, corpus, cache, ModelLoader(str(model_dir)), CFG, CLUSTER)
    assert report.reused >= done - 1  # the shards written before the kill (one may hold the prefix) are reused
    assert report.computed < ref.computed
    assert_same_release(Store.open(cache), want)


def _kept_isolated_kv() -> int:
    from kvfuse.pipeline.isolated_kv import ISOLATED_KV  # the worker's own (imported there, not pickled)
    return len(ISOLATED_KV)


def test_dask_build_keeps_the_isolated_pass_and_stores_the_same_bytes(tmp_path, client, model_dir):
    corpus = write_docs(tmp_path / "c.jsonl", make_docs(n=8))
    loader = ModelLoader(str(model_dir))
    kept = build_on_dask(client, corpus, tmp_path / "kept", loader, CFG, CLUSTER)
    assert set(client.run(_kept_isolated_kv).values()) == {0}  # taken by precompute or dropped after the build
    rerun = build_on_dask(client, corpus, tmp_path / "rerun", loader, replace(CFG, isolated_kv_gb=0, shard_writers=1),
                          CLUSTER)
    assert kept.computed == rerun.computed and kept.prefilled < rerun.prefilled
    assert_same_release(Store.open(tmp_path / "kept"), Store.open(tmp_path / "rerun"))


def test_cli_build_cache_on_the_scheduler_named_by_the_env_var(tmp_path, client, model_dir, reference, monkeypatch):
    from click.testing import CliRunner
    from kvfuse.cli.main import main
    corpus, want, _ = reference
    monkeypatch.setenv("KVFUSE_SCHEDULER", client.scheduler.address)
    out = CliRunner().invoke(main, ["build-cache", str(corpus), "--cache", str(tmp_path / "cache"), "--model",
                                    str(model_dir), "--chunk-tokens", "16", "--neighbour-tokens", "40"])
    assert out.exit_code == 0, out.output
    assert f"{want.stats()['chunks']} chunks" in out.output
    assert [r.chunk_id for r in Store.open(tmp_path / "cache").records()] == [r.chunk_id for r in want.records()]


@pytest.mark.parametrize("gpus,workers,total,want", [
    (0, 1, 10**6, dask_job.CPU_TASK_TOKENS),             # CPU: small tasks (minutes each already)
    (1, 1, 10**6, dask_job.GPU_TASK_TOKENS),             # a big corpus on a GPU: the largest tasks
    (1, 1, 131072, 65536),                                # two tasks per worker
    (4, 4, 131072, dask_job.CPU_TASK_TOKENS),            # a small corpus over 4 GPUs: every GPU gets work
    (2, 2, 200000, 50000),
])
def test_task_tokens_keep_gpus_busy(gpus, workers, total, want):
    class FakeClient:
        def scheduler_info(self):
            return {"workers": {f"w{i}": {} for i in range(workers)}}
    stages = dask_job.DaskStages(FakeClient(), BuildConfig(), ClusterConfig(gpus=gpus))
    assert stages._task_tokens(total) == want
    assert dask_job.DaskStages(FakeClient(), BuildConfig(), ClusterConfig(gpus=gpus, task_tokens=150))._task_tokens(total) == 150
