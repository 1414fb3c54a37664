"""Issue 13, store half: every flipped bit or truncation of a shard, the index or the manifest is
detected with the file named; CURRENT garbage; symlinks; other users; disk full; clear errors.
Store-level (no model): see tests/test_integrity_build.py for builds, repair and fallback."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_store import make_chunk, some_chunks, write_release

from kvfuse.cli.main import main
from kvfuse.loader import format as fmt
from kvfuse.loader.errors import NoReleaseError, StoreError, UnsafePathError
from kvfuse.loader.gc import collect
from kvfuse.loader.manifest import (
    DIGEST_SUFFIX, SUMS_SUFFIX, Digest, manifest_path, read_manifest, write_current, write_manifest,
)
from kvfuse.loader.store import Store, verify_release
from kvfuse.loader.writer import ShardWriter, init_cache_dir


def flip(path: Path, offset: int, bit: int) -> None:
    """Flip one bit in place (flipping it again restores the file)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def open_and_read_all(cache: Path) -> None:
    with Store.open(cache, lease=False) as store:
        for rec in store.records(include_prefix=True):
            store.read(rec.chunk_id)


@pytest.fixture
def release(tmp_path):
    cache = tmp_path / "cache"
    rel, shards = write_release(cache, some_chunks(4), target_bytes=1 << 20)  # one shard holding all
    return cache, rel, shards


# ---- 100% detection, file named ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["index", "manifest", "digest"])
def test_every_bit_flip_in_index_or_manifest_is_detected_naming_the_file(release, which):
    cache, rel, _ = release
    m = read_manifest(cache, rel)
    path = {"index": cache / m["index"], "manifest": manifest_path(cache, rel),
            "digest": manifest_path(cache, rel).with_name(f"{rel}.json{DIGEST_SUFFIX}")}[which]
    original = path.read_bytes()
    rng = random.Random(0)
    for offset in range(len(original)):  # every byte, a random bit of each
        bit = rng.randrange(8)
        flip(path, offset, bit)
        with pytest.raises(StoreError) as e:
            open_and_read_all(cache)
        assert path.name in str(e.value), (offset, str(e.value))
        flip(path, offset, bit)
    open_and_read_all(cache)


def test_every_bit_flip_or_truncation_of_a_shard_is_detected_naming_file_and_chunk(release):
    cache, rel, shards = release
    (shard,) = set(shards.values())
    path = cache / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}"
    original = path.read_bytes()
    rng = random.Random(1)
    for offset in range(len(original)):
        bit = rng.randrange(8)
        flip(path, offset, bit)
        report = verify_release(cache)
        assert not report.ok and all(path.name in p.file for p in report.problems), offset
        assert report.bad_chunks, offset  # the chunks it takes down are named
        if offset % 16 == 0:  # reads fail too (verify_release reads through the same Store.read)
            with pytest.raises(StoreError, match=shard):
                open_and_read_all(cache)
        flip(path, offset, bit)
    for size in (0, 7, 8, 100, len(original) // 2, len(original) - 1):
        path.write_bytes(original[:size])
        report = verify_release(cache)
        assert not report.ok and report.bad_chunks == set(shards), size
    path.write_bytes(original)
    assert verify_release(cache).ok


def test_verify_cli_names_the_three_chunks_with_a_flipped_byte(tmp_path):
    cache = tmp_path / "cache"
    _, shards = write_release(cache, some_chunks(6), target_bytes=1)  # a shard per chunk
    assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0
    bad = sorted(shards)[2:5]
    for cid in bad:
        path = cache / fmt.SHARDS_DIR / f"{shards[cid]}{fmt.SHARD_SUFFIX}"
        flip(path, path.stat().st_size - 3, 0)  # in the data, past the header
    out = CliRunner().invoke(main, ["verify", str(cache)])
    assert out.exit_code == 1
    named = {line.split()[-1] for line in out.output.splitlines() if line.strip().startswith("chunk ")}
    assert named == set(bad), out.output
    assert "--repair" in out.output
    quick = CliRunner().invoke(main, ["verify", str(cache), "--quick", "--json"])
    assert quick.exit_code == 0 and json.loads(quick.output)["checksummed"] is False  # data flips need checksums


def test_verify_of_a_folder_without_a_release_gives_no_repair_advice(tmp_path):
    """An empty folder or a cache's parent has no release to repair: `build-cache --repair` there
    would build a second cache in the wrong folder. The line naming the problem says what to do."""
    cache = tmp_path / "cache"
    write_release(cache, some_chunks(2), target_bytes=1)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path):
        out = CliRunner().invoke(main, ["verify", str(folder)])
        assert out.exit_code == 1 and "--repair" not in out.output, out.output
        assert "nothing to repair" in out.output
    assert "did you mean" in CliRunner().invoke(main, ["verify", str(tmp_path)]).output


def test_verify_counts_in_words(tmp_path):
    cache = tmp_path / "cache"
    _, shards = write_release(cache, some_chunks(3), target_bytes=1)
    path = cache / fmt.SHARDS_DIR / f"{shards[sorted(shards)[0]]}{fmt.SHARD_SUFFIX}"
    flip(path, path.stat().st_size - 3, 0)
    out = CliRunner().invoke(main, ["verify", str(cache)]).output
    assert "1 problem, 1 bad chunk;" in out, out


def test_verify_and_inspect_of_a_release_id_the_cache_lacks(tmp_path):
    """A wrong --release is the caller's mistake: a clear error naming the releases, no repair advice;
    `inspect --chunks` lists the ids an unknown-chunk error points to."""
    cache = tmp_path / "cache"
    write_release(cache, some_chunks(3), target_bytes=1)
    for cmd in ("verify", "inspect"):
        out = CliRunner().invoke(main, [cmd, str(cache), "--release", "r9999-nope"])
        said = out.output + str(out.exception or "")   # `kvfuse` prints a StoreError as "error: ..." (cli.main.run)
        assert out.exit_code != 0 and "unknown release 'r9999-nope'" in said and "releases: r0001" in said, said
        assert "--repair" not in said and "problems" not in said
    listed = CliRunner().invoke(main, ["inspect", str(cache), "--chunks"])
    with Store.open(cache, lease=False) as store:
        assert listed.exit_code == 0 and listed.output.split() == store.chunk_ids()
        assert store.chunk_ids()[0] == store.prefix_id and len(store.chunk_ids()) == len(store)


def test_manifest_digest_sidecar_lost_or_manifest_key_missing_is_named(release):
    cache, rel, _ = release
    mpath = manifest_path(cache, rel)
    m = read_manifest(cache, rel)
    del m["index"]
    write_manifest(cache, m)  # a consistent manifest that lacks the key
    with pytest.raises(StoreError, match=r"has no 'index' key") as e:
        Store.open(cache)
    assert mpath.name in str(e.value)
    mpath.write_bytes(b"\xff\xfe garbled \x80")  # not UTF-8, digest rewritten to match
    (mpath.parent / (mpath.name + DIGEST_SUFFIX)).write_text(Digest.of(mpath.read_bytes()).xxh3_128 + "\n")
    with pytest.raises(StoreError, match="not UTF-8 text"):
        Store.open(cache)


# ---- CURRENT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"\x00\xff garbage\n", b"../../etc/passwd\n", b"r9999-missing\n",
                                     b"/abs/path\n"])
def test_current_garbage_missing_or_outside_is_a_clear_error(release, content):
    cache, rel, _ = release
    (cache / fmt.CURRENT_FILE).write_bytes(content)
    with pytest.raises(StoreError) as e:
        Store.open(cache)
    msg = str(e.value)
    assert fmt.CURRENT_FILE in msg or "unknown release" in msg
    assert isinstance(e.value, (StoreError, NoReleaseError, UnsafePathError))
    write_current(cache, rel)
    open_and_read_all(cache)


# ---- symlinks -----------------------------------------------------------------------------------------


def test_a_symlinked_shards_folder_is_read_but_a_shard_linking_outside_is_refused(tmp_path):
    cache, other = tmp_path / "cache", tmp_path / "other-disk"
    other.mkdir()
    init_cache_dir(cache)
    (cache / fmt.SHARDS_DIR).rmdir()
    (cache / fmt.SHARDS_DIR).symlink_to(other, target_is_directory=True)
    write_release(cache, some_chunks(3))
    assert list(other.glob(f"*{fmt.SHARD_SUFFIX}"))  # the build wrote there
    open_and_read_all(cache)  # and every read accepts it
    assert verify_release(cache).ok
    # a shard file that is a link out of the shards folder is refused
    victim = next(other.glob(f"*{fmt.SHARD_SUFFIX}"))
    outside = tmp_path / "outside.safetensors"
    shutil.move(victim, outside)
    victim.symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside the shards folder"):
        open_and_read_all(cache)


# ---- readers, gc ----------------------------------------------------------------------------------------


def test_a_reader_whose_release_was_collected_is_told_so_not_told_to_rebuild(tmp_path):
    cache = tmp_path / "cache"
    r1, shards1 = write_release(cache, some_chunks(2, prefix="a"), target_bytes=1)
    reader = Store.open(cache, lease=False)  # e.g. a reader on a read-only mount: no lease
    write_release(cache, some_chunks(2, seed0=10, prefix="b"), target_bytes=1)
    assert r1 in collect(cache, keep=1, grace_s=0).releases
    with pytest.raises(NoReleaseError, match="collected by `kvfuse gc`") as e:
        reader.read(sorted(shards1)[0])
    assert "rebuild" not in str(e.value) and "damaged" not in str(e.value)


def test_gc_dry_run_on_a_read_only_mount(tmp_path):
    cache, ro = tmp_path / "cache", tmp_path / "ro"
    write_release(cache, some_chunks(2, prefix="a"))
    write_release(cache, some_chunks(2, seed0=10, prefix="b"))
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(cache), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")
        report = collect(ro, keep=1, dry_run=True, grace_s=0)
        assert len(report.releases) == 1
        out = CliRunner().invoke(main, ["gc", str(ro), "--keep", "1", "--grace", "0", "--dry-run"])
        assert out.exit_code == 0 and "would delete 1 releases" in out.output
        open_and_read_all(ro)  # readers on a read-only cache work (no lease written)
    finally:
        subprocess.run(["umount", str(ro)])


# ---- permissions ----------------------------------------------------------------------------------------


def test_cache_files_are_readable_by_another_user_when_the_umask_allows(tmp_path):
    import tempfile
    top = Path(tempfile.mkdtemp(prefix="kvfuse-perm-", dir="/tmp"))  # pytest's tmp folders are owner-only
    os.chmod(top, 0o755)
    old = os.umask(0o022)
    try:
        cache = top / "cache"
        write_release(cache, some_chunks(2))
    finally:
        os.umask(old)
    files = [p for p in cache.rglob("*") if p.is_file() and p.name != ".lock"]
    assert files and all(p.stat().st_mode & 0o044 == 0o044 for p in files), \
        [(p.name, oct(p.stat().st_mode)) for p in files if p.stat().st_mode & 0o044 != 0o044]
    if os.getuid() != 0:
        return
    pid = os.fork()
    if pid == 0:  # child: become nobody and read every file
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            for p in files:
                p.read_bytes()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(top)
    assert os.waitstatus_to_exitcode(status) == 0, "user nobody could not read the cache"


# ---- disk full ----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_disk_full_mid_shard_is_a_clear_error_and_the_previous_release_stays(small_disk):
    cache = small_disk / "cache"
    rel, _ = write_release(cache, some_chunks(2))
    w = ShardWriter(cache, {"format_version": "1"}, target_bytes=1 << 30)
    for i in range(8):  # ~128 KiB: more than the disk has
        kv, tok, sal = make_chunk(100 + i, 256)
        w.add(f"big{i}", kv, tok, sal)
    with pytest.raises(StoreError, match="No space left") as e:
        w.flush()
    assert "shards/s-" in str(e.value) and "rerun" in str(e.value)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert not list((cache / fmt.SHARDS_DIR).glob(".*.tmp"))  # nothing half-written stays
    assert Store.open(cache).release == rel
    assert verify_release(cache).ok


# ---- item 10 ------------------------------------------------------------------------------------------


def test_cache_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "cache"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        init_cache_dir(f)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "the cat"}\n')
    out = CliRunner().invoke(main, ["build-cache", str(corpus), "--cache", str(f), "--in-process"])
    assert out.exit_code != 0 and "is a file" in out.output and "Errno 17" not in out.output


def test_disk_full_under_dask_is_not_retried(monkeypatch):
    from kvfuse.pipeline import dask_job

    calls = []

    def full(*a, **k):
        calls.append(1)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise StoreError("cannot write shard x: No space left on device") from e

    monkeypatch.setattr(dask_job, "compute_jobs", full)
    monkeypatch.setattr(dask_job, "_plugin", lambda: type("P", (), {"model": lambda self: None})())
    out = dask_job.precompute_task((), [], "/nowhere", {}, 1)
    assert isinstance(out, dask_job.Unretryable) and "No space" in out.message and len(calls) == 1
    monkeypatch.setattr(dask_job, "compute_jobs", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("flaky")))
    with pytest.raises(RuntimeError):  # other errors are raised, so Dask retries them
        dask_job.precompute_task((), [], "/nowhere", {}, 1)


def test_shard_sums_file_holds_the_writers_checksums(tmp_path):
    cache = tmp_path / "cache"
    chunks = some_chunks(2)
    _, shards = write_release(cache, chunks, target_bytes=1 << 20)
    (shard,) = set(shards.values())
    sums = json.loads((cache / fmt.SHARDS_DIR / f"{shard}{SUMS_SUFFIX}").read_text())
    assert sums["chunks"] == {cid: fmt.checksum(*t) for cid, t in chunks.items()}
    assert sums["bytes"] == (cache / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}").stat().st_size
    assert torch.equal(Store.open(cache).read(sorted(chunks)[0]).kv, chunks[sorted(chunks)[0]][0])


# ---- SIGKILL around the CURRENT swap ------------------------------------------------------------------

def sigkill_at_marker(script: str, cache: Path, marker: Path) -> None:
    """Run script (argv: cache, marker, tests folder) and SIGKILL it once it writes marker."""
    import signal
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", script, str(cache), str(marker), str(Path(__file__).parent)])
    try:
        deadline = time.monotonic() + 180   # the script imports torch: slow on a loaded 2-core machine
        while not (marker.exists() and marker.stat().st_size):   # written, not just created
            assert proc.poll() is None and time.monotonic() < deadline, "the script never reached its marker"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


KILL_AT_SWAP = """
import sys, time
sys.path.insert(0, sys.argv[3])
from pathlib import Path
import kvfuse.loader.writer as writer
from test_store import some_chunks, write_release

def stuck(cache_dir, release):  # the manifest is written; CURRENT is about to be replaced
    Path(sys.argv[2]).write_text(release)
    time.sleep(120)

writer.write_current = stuck
write_release(Path(sys.argv[1]), some_chunks(2, seed0=50, prefix="k"))
"""


def test_sigkill_just_before_the_current_swap_keeps_the_previous_release_and_gc_collects_the_orphan(tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    r1, _ = write_release(cache, some_chunks(2, prefix="a"))
    sigkill_at_marker(KILL_AT_SWAP, cache, marker)
    orphan = marker.read_text()
    assert Store.open(cache).release == r1 and verify_release(cache).ok
    assert verify_release(cache, orphan).ok  # whole, but never current
    r3, _ = write_release(cache, some_chunks(2, seed0=60, prefix="b"))  # the rerun
    report = collect(cache, keep=2, grace_s=0)
    assert orphan in report.releases and {r1, r3} <= set(report.kept)


KILL_MID_GC = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from kvfuse.loader.gc import collect

real, n = Path.unlink, [0]
def slow_unlink(self, missing_ok=False):  # gc is killed after its third deletion
    n[0] += 1
    if n[0] == 4:
        Path(sys.argv[2]).write_text("x")
        time.sleep(120)
    return real(self, missing_ok=missing_ok)
Path.unlink = slow_unlink
collect(Path(sys.argv[1]), keep=1, grace_s=0)
"""


def test_sigkill_mid_gc_leaves_the_kept_releases_whole_and_a_rerun_finishes(tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    for i in range(3):
        write_release(cache, some_chunks(2, seed0=10 * i, prefix=f"r{i}"), target_bytes=1)
    current = Store.open(cache, lease=False).release
    sigkill_at_marker(KILL_MID_GC, cache, marker)
    assert verify_release(cache).ok and Store.open(cache).release == current
    report = collect(cache, keep=1, grace_s=0)  # the rerun finishes the job
    assert report.kept == [current] and verify_release(cache).ok
    with Store.open(cache, lease=False) as store:
        used = {r.shard for r in store.records(include_prefix=True)}
    assert {p.name.removesuffix(fmt.SHARD_SUFFIX) for p in (cache / fmt.SHARDS_DIR).glob(f"*{fmt.SHARD_SUFFIX}")} == used


def test_a_manifest_from_before_digests_still_opens_but_a_lost_digest_file_is_reported(release):
    cache, rel, _ = release
    mpath = manifest_path(cache, rel)
    sidecar = mpath.with_name(mpath.name + DIGEST_SUFFIX)
    sidecar.unlink()
    with pytest.raises(StoreError, match="has lost its digest file"):
        Store.open(cache)
    m = json.loads(mpath.read_text())
    for key in ("index_digest", "shards"):
        del m[key]
    mpath.write_text(json.dumps(m))  # as an older kvfuse wrote it
    open_and_read_all(cache)
    assert verify_release(cache).ok


def test_readers_during_publishes_and_gc_never_see_damage(tmp_path):
    """Readers loop (open CURRENT, read every chunk, close) while releases are published and gc runs
    with no grace period: every open succeeds, or (the reader lost a race with gc) says the release
    was collected; never "damaged", never a checksum failure."""
    import threading

    cache = tmp_path / "cache"
    write_release(cache, some_chunks(2, prefix="p0"), target_bytes=1)
    stop, errors, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                with Store.open(cache) as store:
                    for rec in store.records(include_prefix=True):
                        store.read(rec.chunk_id)
                reads[0] += 1
            except NoReleaseError as e:
                if "collected" not in str(e):
                    errors.append(e)
            except Exception as e:  # noqa: BLE001 - any other error is a failure of the test
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 12):
            write_release(cache, some_chunks(2, seed0=10 * i, prefix=f"p{i}"), target_bytes=1)
            collect(cache, keep=1, grace_s=0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert reads[0] > 0


def test_cli_commands_reading_the_index_exit_cleanly(release):
    """pq.read_table's threads made ~half of `kvfuse inspect`/`gc` processes abort at exit (status 134)."""
    import sys

    cache, _, _ = release
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    for args in (["inspect", str(cache)], ["verify", str(cache)], ["gc", str(cache), "--keep", "1", "--dry-run"],
                 ["inspect", str(cache)]):
        out = subprocess.run([sys.executable, "-m", "kvfuse.cli", *args], capture_output=True, text=True, env=env)
        assert out.returncode == 0, (args, out.returncode, out.stderr[-300:])


@pytest.mark.parametrize("damage", ["manifest", "current", "manifest_gone"])
def test_verify_of_a_cache_whose_release_cannot_be_opened_still_advises_the_repair(tmp_path, damage):
    """A damaged CURRENT or manifest is a cache to repair (review: the 'nothing to repair' line for
    folders without a release first caught these too)."""
    cache = tmp_path / "cache"
    release, _ = write_release(cache, some_chunks(2), target_bytes=1)
    if damage == "manifest":
        path = manifest_path(cache, release)
        flip(path, path.stat().st_size // 2, 0)
    elif damage == "current":
        (cache / fmt.CURRENT_FILE).write_text("../../etc\n")
    else:
        manifest_path(cache, release).unlink()
    out = CliRunner().invoke(main, ["verify", str(cache)])
    assert out.exit_code == 1 and "nothing to repair" not in out.output, out.output
    assert f"its current release could not be opened; run `kvfuse build-cache CORPUS --cache {cache}`" in out.output


def test_repair_advice_names_an_object_storage_cache_by_its_url(tmp_path, monkeypatch):
    """A cache on object storage is read through a local mirror; advice must name the URL the user
    gave (a build into the mirror folder would not repair the bucket). Found in review."""
    from types import SimpleNamespace

    from kvfuse.loader import fs
    from kvfuse.loader import store as store_module
    from kvfuse.loader.manifest import shown_cache

    mirror = tmp_path / "mirror" / "s3" / "bucket" / "kv"
    monkeypatch.setattr(fs, "remote_of", lambda d: SimpleNamespace(url="s3://bucket/kv") if Path(d) == mirror else None)
    assert shown_cache(mirror) == "s3://bucket/kv" and shown_cache(tmp_path) == str(tmp_path)
    advice = store_module._repair_advice(mirror)
    assert "--cache s3://bucket/kv --repair" in advice and str(mirror) not in advice
