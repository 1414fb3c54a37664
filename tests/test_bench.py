"""The benchmark code runs end to end on a CPU with the tiny shape (the numbers mean nothing here)."""

import json
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from kvfuse.bench.serve import request_stream
from kvfuse.cli.main import main


def test_request_stream_is_zipf_and_distinct():
    stream = request_stream(50, 8, 300, s=1.0, seed=0)
    assert all(len(set(r)) == 8 and all(0 <= c < 50 for c in r) for r in stream)
    counts = Counter(c for r in stream for c in r).most_common()
    assert counts[0][1] > 3 * counts[-1][1]           # popular chunks are asked for far more often
    assert stream == request_stream(50, 8, 300, s=1.0, seed=0)
    with pytest.raises(ValueError, match="corpus"):
        request_stream(4, 8, 1, s=1.0, seed=0)


def test_bench_commands_smoke(tmp_path):
    common = ["--device", "cpu", "--store-root", str(tmp_path / "stores"), "--out", str(tmp_path / "out"),
              "--host-pool-gb", "0.002", "--gpu-pool-gb", "0.001"]
    r = CliRunner().invoke(main, ["bench", "ttft", "--shapes", "tiny", "--contexts", "1024", "--ratios", "0.15",
                                  "--reps", "1", "--profile", "none", *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "ttft.json").read_text())
    row = res["shapes"][0]["rows"][0]
    assert row["context"] == 1024 and row["warm"]["warm"] + row["warm"]["cold"] == 3
    assert row["hot"]["hot"] == 3 and row["warm"]["n_selected"] == round(0.15 * 1024)
    # the cold run plans with what a warm request taught it (the tiny model's fused pass is slow per token)
    plan = row["cold"]["cold_plan"]
    assert plan["rates"]["fused_scale"] != 1.0
    everything = plan["recomputed"] == len(plan["choices"])   # the plan chose the full prefill
    assert row["cold"]["n_selected"] == 1024 if everything else 0 < row["cold"]["n_selected"] < 1024
    assert "| 1024 | 0.15 |" in (tmp_path / "out" / "ttft.md").read_text()
    shapes = row["new_shapes"]   # warm requests with questions of new lengths, full prefills of new lengths
    assert len(shapes["fused_runs_ms"]) == len(shapes["full_runs_ms"]) == 1 and shapes["speedup"] > 0
    assert "questions" not in shapes and "new question lengths" in (tmp_path / "out" / "ttft.md").read_text()
    r = CliRunner().invoke(main, ["bench", "serve", "--shape", "tiny", "--corpus-chunks", "12", "--context", "1024",
                                  "--requests", "6", "--warmup", "1", *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    serve = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert [p["policy"] for p in serve["policies"]] == ["lru", "lookahead"]
    assert all(p["requests"] == 6 and p["chunk_accesses"] == 18 for p in serve["policies"])


def test_ttft_pairs_two_stores_in_one_process(tmp_path):
    """--pair-kv-dtype: a second store (fp8 here) timed warm in alternation with the first, the
    paired differences and their interval in the JSON and the Markdown."""
    common = ["--device", "cpu", "--store-root", str(tmp_path / "stores"), "--out", str(tmp_path / "out"),
              "--host-pool-gb", "0.002", "--gpu-pool-gb", "0.001"]
    r = CliRunner().invoke(main, ["bench", "ttft", "--shapes", "tiny", "--contexts", "1024", "--ratios", "0.15",
                                  "--reps", "1", "--profile", "none", "--compare-selectors", "none",
                                  "--pair-kv-dtype", "fp8", "--pair-reps", "3", *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "out" / "ttft.json").read_text())["shapes"][0]["rows"][0]
    pair = row["kv_pair"]
    assert pair["a"] == "model" and pair["b"] == "fp8" and pair["pairs"] == 3
    assert len(pair["a_runs_ms"]) == len(pair["b_runs_ms"]) == 3
    diffs = [b - a for a, b in zip(pair["a_runs_ms"], pair["b_runs_ms"])]
    assert pair["diff_ms_mean"] == pytest.approx(sum(diffs) / 3, abs=0.02)
    lo, hi = pair["diff_ms_ci95"]
    assert min(diffs) - 0.01 <= lo <= hi <= max(diffs) + 0.01
    assert (tmp_path / "stores" / "tiny-fp8").is_dir()
    assert "| 1024 | 0.15 | model | fp8 |" in (tmp_path / "out" / "ttft.md").read_text()


def test_ttft_summary_of_runs_with_different_plans():
    """Cold runs of one request may take different plans (a split with repair passes, then the
    full prefill, which has none): the summary takes each timing's median over the runs that have it."""
    from kvfuse.bench.ttft import _summary
    runs = [{"ttft_ms": 10.0, "select_s": 0.002, "repair_s": 0.001, "recompute_s": 0.005},
            {"ttft_ms": 8.0, "recompute_s": 0.008},
            {"ttft_ms": 9.0, "select_s": 0.004, "repair_s": 0.003, "recompute_s": 0.006}]
    out = _summary(runs)
    assert out["ttft_ms"] == 9.0 and out["runs_ms"] == [10.0, 8.0, 9.0]
    assert out["repair_s"] == pytest.approx(0.002) and out["select_s"] == pytest.approx(0.003)
    assert out["recompute_s"] == pytest.approx(0.006)
    assert out["stages_runs"]["select_s"] == [0.002, None, 0.004]        # each run's, to find a slow run's stage
    assert out["stages_runs"]["recompute_s"] == [0.005, 0.008, 0.006] and "stall_ms" not in out["stages_runs"]


def _page_cache_drops(folder) -> bool:
    """Whether this filesystem forgets a file's pages on request (tmpfs keeps them: they are the file)."""
    import os
    from kvfuse.loader.prefetch import resident_bytes
    path = folder / "probe.bin"
    path.write_bytes(b"x" * (1 << 16))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return resident_bytes(fd) == 0
    finally:
        os.close(fd)


def test_cold_runs_of_a_quantised_store_are_cold(tmp_path):
    """The cold runs drop the page cache; pages some part of the process maps stay (the bench once
    read each chunk's tokens with `Store.read`, which dequantises an int8/fp8 chunk through its
    memory map, so "cold" runs of a quantised store read from memory). The bench reports what the
    drop left, and it is nothing."""
    (tmp_path / "stores").mkdir()
    if not _page_cache_drops(tmp_path / "stores"):
        pytest.skip("this filesystem keeps file pages in memory whatever is asked (tmpfs)")
    common = ["--device", "cpu", "--store-root", str(tmp_path / "stores"), "--out", str(tmp_path / "out"),
              "--host-pool-gb", "0.002", "--gpu-pool-gb", "0.001"]
    r = CliRunner().invoke(main, ["bench", "ttft", "--shapes", "tiny", "--contexts", "1024", "--ratios", "0.15",
                                  "--reps", "1", "--profile", "none", "--compare-selectors", "none",
                                  "--kv-dtype", "int8", *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "out" / "ttft.json").read_text())["shapes"][0]["rows"][0]
    assert row["cold"]["page_cache_mb"] == 0.0


def test_copy_ceiling_loader_mode_builds_a_layerwise_load():
    """`bench/copy_ceiling.py --modes loader` (run_device.sh's copy phase) hands LayerwiseLoad its
    stub tiers: they must carry what the load reads (the model dtype, the codec); it failed with
    AttributeError once the load read `tiers.dtype`."""
    from kvfuse.bench.copy_ceiling import make_request
    from kvfuse.runtime.layerwise import LayerwiseLoad
    tiers, pairs, nbytes = make_request("qwen2.5-7b", 1024, 512, "cpu")
    load = LayerwiseLoad(tiers, "bench", list(pairs), 32, torch.ones(pairs[0][0].kv.shape[-1] // 2), depth=0,
                         measure_stall=True, counts={"warm": len(pairs)}, first=1)
    load.issue_all()
    info = load.close()
    assert info["h2d_bytes"] == nbytes
