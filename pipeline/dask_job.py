"""The build as a Dask job (DESIGN §3): `kvfuse build-cache` on a LocalCluster or an existing cluster.

    with open_client(ClusterConfig(gpus=1)) as client:
        report = build_on_dask(client, "corpus.jsonl", "cache/", ModelLoader("smollm2-135m"), BuildConfig())

The driver (pipeline/build.py `run_build`) reads the corpus, relates chunks,
decides what to compute and publishes; everything that needs the model runs as
Dask tasks: chunk (tokenizer), embed, and precompute+write. The model is loaded
once per worker by `ModelPlugin` (on first use, in the task thread), GPU tasks
carry `resources={"GPU": 1}`, failed tasks are retried, and a progress bar
follows the futures. Each precompute task writes complete shards (tmp + fsync +
rename) into the cache folder before it returns, so when the driver publishes,
every chunk of the release is on disk; after a crash of a worker or of the
driver, a rerun finds those shards and skips their chunks.

On an existing cluster (`--scheduler tcp://host:8786` or KVFUSE_SCHEDULER) the
cache folder must be on a filesystem every worker and the driver see at the same
path, and GPU workers must be started with `--resources GPU=1`.
"""

from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dask
import torch
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
from tqdm import tqdm

from kvfuse.loader.fs import is_url, worker_dir, worker_location
from kvfuse.runtime.model import LoadedModel, load_model

from .build import (
    BuildConfig, BuildContext, BuildReport, Computed, Job, chunk_docs, compute_jobs, embed_items, run_build,
)
from .corpus import Document
from .isolated_kv import ISOLATED_KV
from .relate import MiniLM

SCHEDULER_ENV = "KVFUSE_SCHEDULER"
PLUGIN_NAME = "kvfuse-model"


@dataclass(frozen=True)
class ModelLoader:
    """How a worker loads the model: `load_model(name, dtype, device)`. Any picklable
    callable `(device: str) -> LoadedModel` can stand in (the GPU benchmark's random weights)."""

    name: str = "smollm2-135m"
    dtype: str | None = None

    def __call__(self, device: str) -> LoadedModel:
        return load_model(self.name, dtype=self.dtype, device=device)


class ModelPlugin(WorkerPlugin):
    """Holds one model per worker, loaded on first use. With gpus, worker k of a
    LocalCluster takes GPU k (mod the GPUs it sees); a worker of an external cluster
    takes cuda:0 of what CUDA_VISIBLE_DEVICES shows it."""

    name = PLUGIN_NAME

    def __init__(self, loader: Callable[[str], LoadedModel], gpus: bool, torch_threads: int | None = None):
        self.loader, self.gpus, self.torch_threads = loader, gpus, torch_threads
        self.lm: LoadedModel | None = None
        self.minilm: MiniLM | None = None
        self.device = "cpu"

    def setup(self, worker) -> None:
        self._lock = threading.Lock()  # made here: the plugin travels pickled
        if self.gpus:
            index = int(worker.name) if str(worker.name).isdigit() else 0
            self.device = f"cuda:{index % max(1, torch.cuda.device_count())}"
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)

    def model(self) -> LoadedModel:
        with self._lock:
            if self.lm is None:
                if self.device.startswith("cuda"):
                    torch.cuda.set_device(self.device)
                self.lm = self.loader(self.device)
            return self.lm


def _plugin() -> ModelPlugin:
    return get_worker().plugins[PLUGIN_NAME]


# ---------------------------------------------------------------- tasks (run on the workers)

def context_task() -> BuildContext:
    return BuildContext.of(_plugin().model())


def chunk_task(docs: list[Document], chunk_tokens: int):
    return chunk_docs(_plugin().model(), docs, chunk_tokens)


def embed_task(prefix_ids, items, embedder: str, keep_bytes: int = 0) -> dict[str, torch.Tensor]:
    """Embeddings of items; with keep_bytes, their isolated KV is kept on this worker for precompute_task."""
    plugin = _plugin()
    if embedder == "minilm" and plugin.minilm is None:
        plugin.minilm = MiniLM()
    keep = ISOLATED_KV.configure(keep_bytes) if keep_bytes else None
    return embed_items(plugin.model(), prefix_ids, items, embedder, plugin.minilm, keep)


def release_task() -> None:
    """Drop the isolated KV this worker kept and no precompute task took."""
    ISOLATED_KV.clear()


@dataclass(frozen=True)
class Unretryable:
    """A task's error that a retry can't fix (disk full, no permission): returned, not raised,
    so Dask does not rerun the whole prefill before the driver reports it."""

    message: str


UNRETRYABLE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def unretryable(e: BaseException) -> bool:
    """Whether e (or what it wraps) is an OSError no retry can fix."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in UNRETRYABLE_ERRNOS:
            return True
        e = e.__cause__
    return False


def precompute_task(prefix_ids, jobs: list[Job], cache_dir: str | tuple, metadata: dict, shard_bytes: int,
                    writers: int = 2):
    try:  # cache_dir: a path, or (URL, storage options, mirror root): shards go to the object store from here
        return compute_jobs(_plugin().model(), prefix_ids, jobs, worker_dir(cache_dir), metadata, shard_bytes,
                            writers=writers, keep=ISOLATED_KV)
    except Exception as e:
        if unretryable(e):
            return Unretryable(str(e))
        raise


# ---------------------------------------------------------------- the stages, driven from here

# A task ends by waiting for its last shards to be written, while its GPU idles: larger tasks on a GPU
# (H200, fp8 isolated build, 128k tokens: 10.7k tok/s at 16k tokens per task, 12.3k at 64k; docs/pipeline.md).
# On the CPU a task of 16k tokens is already minutes of prefill (and the progress bar moves per task).
GPU_TASK_TOKENS = 65536
CPU_TASK_TOKENS = 16384


@dataclass
class ClusterConfig:
    scheduler: str | None = None      # an existing scheduler; default: $KVFUSE_SCHEDULER, else a LocalCluster
    workers: int | None = None        # LocalCluster workers; default: one per GPU, or one on the CPU
    gpus: int = 0                     # GPUs to use (tasks then carry resources={"GPU": 1})
    torch_threads: int | None = None  # per worker; default: the machine's cores split among the workers
    retries: int = 2                  # per task
    task_tokens: int | None = None    # prefill cost per precompute task (one or more shards each); default:
                                      # GPU_TASK_TOKENS with gpus, else CPU_TASK_TOKENS
    dashboard: bool = False


def _batches(items: list, size_of: Callable, limit: int) -> list[list]:
    out, cur, n = [], [], 0
    for item in items:
        if cur and n + size_of(item) > limit:
            out.append(cur)
            cur, n = [], 0
        cur.append(item)
        n += size_of(item)
    return out + ([cur] if cur else [])


class DaskStages:
    """The model stages of run_build as Dask tasks."""

    def __init__(self, client: Client, config: BuildConfig, cluster: ClusterConfig):
        self.client, self.config, self.cluster = client, config, cluster
        self.resources = {"GPU": 1} if cluster.gpus else None

    def _submit(self, fn, *args, **kw):
        return self.client.submit(fn, *args, pure=False, retries=self.cluster.retries, resources=self.resources, **kw)

    def context(self) -> BuildContext:
        workers = list(self.client.scheduler_info()["workers"])
        if not workers:
            raise RuntimeError("the Dask cluster has no workers; start some (`dask worker ADDR`) and rerun.")
        # one task per worker: every worker loads its model now, before the timed stages
        futures = [self._submit(context_task, workers=[w], allow_other_workers=True) for w in workers]
        return futures[0].result() if len(futures) == 1 else self.client.gather(futures)[0]

    def chunk(self, docs: list[Document]):
        batches = _batches(docs, lambda d: len(d.text), 1 << 20)
        futures = [self.client.submit(chunk_task, b, self.config.chunk_tokens, pure=False, retries=self.cluster.retries)
                   for b in batches]
        _follow(futures, [len(b) for b in batches], "chunk", "doc", self.config.progress)
        return [c for part in self.client.gather(futures) for c in part]

    def embed(self, ctx: BuildContext, items):
        batches = _batches(items, lambda it: len(it[1]), 8192)
        keep = int(self.config.isolated_kv_gb * 2**30)
        futures = {self._submit(embed_task, ctx.prefix_ids, b, self.config.embedder, keep): len(b) for b in batches}
        with tqdm(total=len(items), desc="embed", unit="chunk", disable=not self.config.progress) as bar:
            for fut in as_completed(futures):
                yield fut.result()
                bar.update(futures[fut])

    def _task_tokens(self, total: int) -> int:
        """Prefill tokens per precompute task: ClusterConfig.task_tokens, else on GPUs up to
        GPU_TASK_TOKENS but small enough for two tasks per worker (a small corpus still keeps
        every GPU busy), never under CPU_TASK_TOKENS; on the CPU, CPU_TASK_TOKENS."""
        if self.cluster.task_tokens:
            return self.cluster.task_tokens
        if not self.cluster.gpus:
            return CPU_TASK_TOKENS
        workers = max(1, len(self.client.scheduler_info()["workers"]))
        return max(CPU_TASK_TOKENS, min(GPU_TASK_TOKENS, -(-total // (2 * workers))))

    def precompute(self, ctx: BuildContext, jobs: list[Job], cache_dir: Path):
        batches = _batches(jobs, lambda j: j.cost, self._task_tokens(sum(j.cost for j in jobs)))
        meta = ctx.shard_metadata()
        futures = [self._submit(precompute_task, ctx.prefix_ids, b, worker_location(cache_dir), meta,
                                self.config.shard_bytes, self.config.shard_writers)
                   for b in batches]
        failed = _follow(futures, [sum(j.cost for j in b) for b in batches], "prefill", "tok", self.config.progress)
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(futures)} precompute tasks failed after {self.cluster.retries} "
                               f"retries (first error: {failed[0]!r}); nothing was published. The shards the other "
                               "tasks wrote are kept: rerun the build to finish.")
        parts = self.client.gather(futures)
        stopped = [p for p in parts if isinstance(p, Unretryable)]
        if stopped:
            raise RuntimeError(f"{len(stopped)} of {len(futures)} precompute tasks stopped on an error a retry can't "
                               f"fix: {stopped[0].message}")
        out = Computed(w for part in parts for w in part)
        out.isolated_kept_tokens = sum(getattr(p, "isolated_kept_tokens", 0) for p in parts)
        return out

    def release(self) -> None:
        """Every worker drops the isolated KV it kept (a worker that died took it along)."""
        try:
            self.client.run(release_task)
        except Exception:  # a worker gone or unreachable: nothing of it to free
            pass


def _follow(futures, sizes, desc, unit, progress) -> list[BaseException]:
    """Progress bar over futures as they finish; returns the errors of those that failed."""
    size = dict(zip(futures, sizes))
    errors = []
    with tqdm(total=sum(sizes), desc=desc, unit=unit, disable=not progress) as bar:
        for fut in as_completed(futures):
            if fut.status == "error":
                errors.append(fut.exception())
            bar.update(size[fut])
    return errors


@contextmanager
def open_client(cluster: ClusterConfig = ClusterConfig()):
    """A Client on cluster.scheduler (or $KVFUSE_SCHEDULER), else on a LocalCluster sized to the machine."""
    address = cluster.scheduler or os.environ.get(SCHEDULER_ENV)
    if address:
        with Client(address) as client:
            yield client
        return
    if cluster.gpus and cluster.gpus > torch.cuda.device_count():
        raise ValueError(f"--gpus {cluster.gpus} but this machine shows {torch.cuda.device_count()} CUDA devices.")
    workers = cluster.workers or max(1, cluster.gpus)
    kw = {"resources": {"GPU": 1}} if cluster.gpus else {}
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which sends every large
    # allocation through mmap/munmap: PyTorch CPU prefill ran ~1.5x slower in such a worker.
    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                         dashboard_address=":0" if cluster.dashboard else None, **kw) as lc, Client(lc) as client:
        yield client


def build_on_dask(client: Client, corpus: str | Path | list[Document], cache_dir: str | Path,
                  loader: Callable[[str], LoadedModel], config: BuildConfig = BuildConfig(),
                  cluster: ClusterConfig = ClusterConfig()) -> BuildReport:
    """Build or refresh the cache at cache_dir with the model work on client's workers."""
    n_workers = max(1, len(client.scheduler_info()["workers"]))
    threads = cluster.torch_threads
    if threads is None and not (cluster.scheduler or os.environ.get(SCHEDULER_ENV)):
        threads = max(1, (os.cpu_count() or 1) // n_workers)  # LocalCluster: split this machine's cores
    plugin = (loader, bool(cluster.gpus), threads)
    if getattr(client, "_kvfuse_plugin", None) != plugin:  # same model on the same client: keep it loaded
        client.register_plugin(ModelPlugin(*plugin), name=PLUGIN_NAME)
        client._kvfuse_plugin = plugin
    cache_dir = cache_dir if is_url(cache_dir) else Path(cache_dir).absolute()
    return run_build(corpus, cache_dir, DaskStages(client, config, cluster), config)
