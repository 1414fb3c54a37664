"""`kvfuse ask` / `serve` on wrong input fail before the model loads, and multi-line answers
stay under their label."""

import pytest
from click.testing import CliRunner

from kvfuse.cli import main as cli
from kvfuse.loader.store import NoReleaseError


@pytest.fixture
def no_model(monkeypatch):
    def load(*_):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(cli, "_load", load)


def test_ask_on_a_folder_that_is_not_a_cache_fails_before_the_model_loads(tmp_path, no_model):
    (tmp_path / "notes.txt").write_text("not a cache")
    r = CliRunner().invoke(cli.main, ["ask", str(tmp_path), "who painted it?"])
    assert isinstance(r.exception, NoReleaseError) and "no current release" in str(r.exception)
    assert "build-cache" in str(r.exception)


def test_ask_with_an_empty_question_fails_before_the_model_loads(tmp_path, no_model):
    r = CliRunner().invoke(cli.main, ["ask", str(tmp_path), "   "])
    assert r.exit_code == 2 and "give a non-empty question" in r.output


def test_serve_on_a_folder_that_is_not_a_cache_fails_before_the_model_loads(tmp_path, no_model):
    r = CliRunner().invoke(cli.main, ["serve", str(tmp_path)])
    assert isinstance(r.exception, NoReleaseError)


def test_multi_line_answers_are_indented_under_their_label():
    assert cli._indented("The answer is:\n\n---\nSeurat.\n") == "The answer is:\n\n" + " " * 12 + "---\n" + " " * 12 + "Seurat."
    assert cli._indented("one line") == "one line" and cli._indented("") == ""


def test_ask_on_a_missing_folder_says_how_to_build_one(tmp_path, no_model):
    missing = tmp_path / "nowhere"
    r = CliRunner().invoke(cli.main, ["ask", str(missing), "who painted it?"])
    assert r.exit_code == 2 and "does not exist" in r.output and ".;" not in r.output
    assert f"kvfuse build-cache CORPUS --cache {missing}" in r.output


def test_the_build_hint_quotes_a_path_with_spaces(tmp_path, no_model):
    missing = tmp_path / "my cache"
    r = CliRunner().invoke(cli.main, ["ask", str(missing), "who painted it?"])
    assert f"--cache '{missing}'" in r.output


def test_selector_names_load_without_the_engine():
    """`ask` checks the selector name before the engine's imports (transformers, ~4 s): the
    selectors and the runtime package load without them (a fresh interpreter)."""
    import subprocess
    import sys
    code = ("import sys, kvfuse.runtime.selectors as s; assert 'kvfuse' in s.SELECTORS; "
            "print('transformers' in sys.modules, 'kvfuse.runtime.engine' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("command", [["ask", "{dir}", "who painted it?"], ["serve", "{dir}"],
                                     ["build-cache", "{dir}/c.jsonl", "--cache", "{dir}/cache"]])
def test_an_unknown_dtype_fails_before_the_model_loads(tmp_path, no_model, command):
    (tmp_path / "c.jsonl").write_text('{"id": "a", "text": "x"}\n')
    r = CliRunner().invoke(cli.main, [a.format(dir=tmp_path) for a in command] + ["--dtype", "float99"])
    assert r.exit_code == 2 and "'float99' is not one of 'float32', 'bfloat16'" in r.output


def test_dtype_aliases_pass_the_check(tmp_path, no_model):
    r = CliRunner().invoke(cli.main, ["ask", str(tmp_path), "who painted it?", "--dtype", "BF16"])
    assert isinstance(r.exception, NoReleaseError)        # got past the option to the folder check


@pytest.mark.parametrize("command", [["ask", "{dir}", "who painted it?"], ["serve", "{dir}"],
                                     ["build-cache", "{dir}/c.jsonl", "--cache", "{dir}/cache"]])
def test_an_unknown_model_fails_before_the_model_loads(tmp_path, no_model, command):
    (tmp_path / "c.jsonl").write_text('{"id": "a", "text": "x"}\n')
    r = CliRunner().invoke(cli.main, [a.format(dir=tmp_path) for a in command] + ["--model", "nosuchmodel"])
    assert r.exit_code == 2 and "unknown model 'nosuchmodel'" in r.output and "smollm2-135m" in r.output


def test_serve_checks_the_model_before_importing_torch(tmp_path):
    import subprocess
    import sys
    code = ("import sys; from click.testing import CliRunner; from kvfuse.cli import main as cli; "
            f"r = CliRunner().invoke(cli.main, ['serve', {str(tmp_path)!r}, '--model', 'nosuch']); "
            "print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["2", "False"]


def test_an_unknown_selector_is_a_usage_error_before_the_model_loads(tmp_path, no_model):
    r = CliRunner().invoke(cli.main, ["ask", str(tmp_path), "who painted it?", "--selector", "bogus"])
    assert r.exit_code == 2 and "unknown selector 'bogus'" in r.output and "kvfuse" in r.output


def test_build_cache_on_an_empty_corpus_fails_before_a_model_or_cluster_starts(tmp_path, no_model, monkeypatch):
    from kvfuse.pipeline import dask_job
    from kvfuse.pipeline.corpus import CorpusError

    def no_cluster(*_):
        raise AssertionError("a Dask cluster was started before the corpus was read")
    monkeypatch.setattr(dask_job, "open_client", no_cluster)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    r = CliRunner().invoke(cli.main, ["build-cache", str(tmp_path / "empty.jsonl"), "--cache", str(tmp_path / "c")])
    assert isinstance(r.exception, CorpusError) and "no documents found" in str(r.exception)
    assert not (tmp_path / "c").exists()


def test_ask_with_another_packaged_model_than_the_cache_was_built_with_fails_before_loading(tmp_path, no_model,
                                                                                          monkeypatch):
    """A cache built with one packaged model, asked with another: refused before that model is converted
    and loaded (~10 s), naming the model to use. (The fingerprint check after loading stays the rule for
    folders and .gguf files.)"""
    from test_store import some_chunks, write_release

    from kvfuse.loader.errors import ModelMismatchError
    from kvfuse.runtime.packaged import PACKAGED_MODELS

    write_release(tmp_path / "cache", some_chunks(2))           # its manifest's model is named "tiny"
    monkeypatch.setitem(PACKAGED_MODELS, "tiny", PACKAGED_MODELS["smollm2-135m"])
    for cmd in (["ask", str(tmp_path / "cache"), "who?"], ["serve", str(tmp_path / "cache")]):
        r = CliRunner().invoke(cli.main, [*cmd, "--model", "smollm2-135m"])
        assert isinstance(r.exception, ModelMismatchError), r.output
        assert "built with model tiny, not smollm2-135m" in str(r.exception) and "--model tiny" in str(r.exception)


def test_inspect_on_a_missing_folder_is_a_usage_error_like_ask_and_verify(tmp_path):
    for cmd in ("inspect", "verify", "ask"):
        r = CliRunner().invoke(cli.main, [cmd, str(tmp_path / "nope"), *(["q"] if cmd == "ask" else [])])
        assert r.exit_code == 2 and "does not exist; build a cache there" in r.output, (cmd, r.output)
