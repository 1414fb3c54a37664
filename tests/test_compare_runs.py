"""bench/compare_runs.py: paired comparison of eval folders on their shared examples."""

import json

import pytest

from kvfuse.bench.compare_runs import compare


def write(folder, rows):
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(ex, method, ratio, score, answer_kl):
    return {"example": ex, "method": method, "ratio": ratio, "score": score, "answer_kl": answer_kl, "kl": 0.1,
            "agree": score == 1.0}


def test_shared_examples_are_paired_and_a_constant_difference_has_a_point_interval(tmp_path):
    full = [row(f"e{i}", "full-prefill", 1.0, 1.0, 0.0) for i in range(4)]
    write(tmp_path / "a", full + [row(f"e{i}", "kvfuse", 0.15, 0.0, 0.3) for i in range(4)])
    write(tmp_path / "b", full + [row(f"e{i}", "kvfuse", 0.15, 1.0, 0.1) for i in range(3)])   # e3 missing
    lines = compare([str(tmp_path / "a"), str(tmp_path / "b")], ["kvfuse", "reuse"], 0.15)
    assert lines[0] == "kvfuse @ 0.15: 3 shared examples"
    assert any("answer_kl -0.200 [-0.200, -0.200]" in line for line in lines)
    assert any("score +1.000 [+1.000, +1.000]" in line for line in lines)
    assert not any(line.startswith("reuse") for line in lines)      # no rows: skipped
    with pytest.raises(SystemExit, match="no results.jsonl"):
        compare([str(tmp_path / "a"), str(tmp_path / "nowhere")], ["kvfuse"], 0.15)
