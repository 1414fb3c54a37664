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


def test_sweep_keeps_the_examples_every_cell_shares(tmp_path):
    """bench/sweep.py: means over the examples present in every (method, ratio) cell; the first
    method's paired answer-KL gain over the others; the report and plot are written."""
    from kvfuse.bench.sweep import main, paired_gains, shared_examples, sweep_table
    from kvfuse.bench.compare_runs import load_rows
    rows = [row(f"e{i}", "full-prefill", 1.0, 1.0, 0.0) for i in range(4)]
    for r, kl in ((0.1, 0.3), (0.2, 0.2)):
        rows += [row(f"e{i}", "kvfuse", r, 1.0, kl) for i in range(4)]
        rows += [row(f"e{i}", "reuse", r, 0.0, kl + 0.1) for i in range(4 if r == 0.1 else 2)]   # n = 2 at 0.2
    write(tmp_path / "run", rows)
    (tmp_path / "run" / "meta.json").write_text(json.dumps({"suite": "facts", "model": "m"}))
    data = load_rows(str(tmp_path / "run"))
    examples = shared_examples(data, ["kvfuse", "reuse"], [0.1, 0.2])
    assert examples == ["e0", "e1"]
    table = sweep_table(data, ["kvfuse", "reuse"], [0.1, 0.2], examples)
    assert [(t["method"], t["ratio"], t["n"]) for t in table] == [("kvfuse", 0.1, 2), ("kvfuse", 0.2, 2),
                                                                  ("reuse", 0.1, 2), ("reuse", 0.2, 2)]
    assert table[0]["answer_kl"] == pytest.approx(0.3) and table[2]["retention"] == 0.0
    gains = paired_gains(data, "kvfuse", ["reuse"], [0.1, 0.2], examples)
    assert [round(g["gain"], 6) for g in gains] == [0.1, 0.1] and gains[0]["lo"] == pytest.approx(0.1)
    main([str(tmp_path / "run"), "--methods", "kvfuse,reuse", "--ratios", "0.1,0.2", "--out", str(tmp_path / "s-qwen2.5")])
    assert (tmp_path / "s-qwen2.5.png").stat().st_size > 0
    assert "| reuse | 0.2 | 0.000 |" in (tmp_path / "s-qwen2.5.md").read_text()
    with pytest.raises(SystemExit, match="every cell"):
        main([str(tmp_path / "run"), "--methods", "kvfuse,prophet", "--ratios", "0.1"])
